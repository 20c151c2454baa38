"""Tests for mixofshow.toyworld: renderer, captions, masks, concept folders, rendered sets, classifier, and the
training script's smoke mode (a loadable pipeline folder)."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixofshow.data import CONCEPT_PLACEHOLDER, ConceptDataset, scan_concept_folder
from mixofshow.tokenizer import load_clip_tokenizer
from mixofshow.toyworld import (
    ACCESSORIES,
    BACKGROUNDS,
    COLOURS,
    COLUMNS,
    PATTERNS,
    ROWS,
    SHAPES,
    SIZES,
    Scene,
    ToyObject,
    caption,
    random_scene,
    render,
    render_with_masks,
)
from mixofshow.toyworld import train as toyworld_train
from mixofshow.toyworld.classifier import AttributeClassifier, load_classifier, save_classifier
from mixofshow.toyworld.concepts import (
    CONCEPTS,
    concept_scenes,
    get_concept,
    random_concept_scene,
    training_images,
    write_concept_folder,
    zoomed_out_scenes,
)
from mixofshow.toyworld.dataset import LABELS, crop_boxes, images_to_tensor, render_set
from mixofshow.toyworld.render import moved_object
from mixofshow.toyworld.train import ToyWorldTrainConfig, config_from_args
from mixofshow.toyworld.train import main as train_main

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_toyworld.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Renderer.


def test_render_is_deterministic():
    for scene in _scenes(10):
        first, masks = render_with_masks(scene)
        second, masks_again = render_with_masks(scene)
        assert first.size == (64, 64) and first.mode == "RGB"
        assert np.array_equal(np.asarray(first), np.asarray(second))
        assert all(np.array_equal(a, b) for a, b in zip(masks, masks_again))
        assert np.array_equal(np.asarray(render(scene)), np.asarray(first))


def test_random_scene_is_seeded():
    assert _scenes(20, seed=3) == _scenes(20, seed=3)
    assert _scenes(20, seed=3) != _scenes(20, seed=4)


def test_random_scenes_cover_the_world_and_never_draw_concept_details():
    scenes = _scenes(400)
    objects = [obj for scene in scenes for obj in scene.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.pattern for o in objects} == set(PATTERNS)
    assert {o.accessory for o in objects} == set(ACCESSORIES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert all(o.emblem is None and o.extra is None for o in objects)


def test_caption_matches_the_scene():
    scene = Scene("navy", (
        ToyObject("circle", "red", "striped", "hat", column="left"),
        ToyObject("star", "orange", "plain", "glasses", column="right", row="top", size="large"),
    ))
    assert caption(scene) == ("a red striped circle with a hat on the left and "
                              "a large orange star with glasses at the top right, navy background")
    assert caption(scene, {1: CONCEPT_PLACEHOLDER}) == ("a red striped circle with a hat on the left and "
                                                        "a large <TOK> with glasses at the top right, navy background")
    for scene in _scenes(50):
        text = caption(scene)
        assert text.endswith(f", {scene.background} background")
        phrases = text.rsplit(", ", 1)[0].split(" and ")
        assert len(phrases) == len(scene.objects)
        for phrase, obj in zip(phrases, scene.objects):
            words = phrase.split()
            assert obj.colour in words and obj.shape in words
            assert (obj.pattern in words) == (obj.pattern != "plain")
            assert (obj.accessory in words) == (obj.accessory != "none")
            assert obj.column in words or (obj.column == "center" and obj.row != "middle")


def test_masks_cover_the_objects():
    for scene in _scenes(30, seed=1):
        image, masks = render_with_masks(scene)
        pixels = np.asarray(image).astype(int)
        background = np.asarray(BACKGROUNDS[scene.background])
        union = np.zeros((64, 64), dtype=bool)
        for mask in masks:
            assert mask.sum() > 10
            assert not (mask & union).any()  # visible parts do not overlap
            union |= mask
            # Mostly not background inside the mask (bright dots/stripes of a pattern may come close to it).
            assert (np.abs(pixels[mask] - background).sum(axis=1) > 30).mean() > 0.7
        # Outside the masks, grown by two pixels for anti-aliased edges and tips, only background.
        grown = union.copy()
        for _ in range(2):
            grown[1:] |= grown[:-1].copy()
            grown[:-1] |= grown[1:].copy()
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
        assert (pixels[~grown] == background).all()


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="'hexagon'"):
        ToyObject("hexagon", "red")
    with pytest.raises(ValueError, match="'teal'"):
        ToyObject("circle", "teal")
    with pytest.raises(ValueError, match="one to three"):
        Scene("white", ())
    with pytest.raises(ValueError, match="unknown toy concept 'bob'"):
        get_concept("bob")


# ---------------------------------------------------------------------------------------------------------------
# Concepts.


def test_concepts_are_distinct_with_deliberate_look_alikes():
    assert len(CONCEPTS) >= 6
    assert len({c.name for c in CONCEPTS}) == len(CONCEPTS)
    assert len({(c.class_word, c.colour, c.emblem, c.extra) for c in CONCEPTS}) == len(CONCEPTS)
    class_words = [c.class_word for c in CONCEPTS]
    assert any(class_words.count(w) >= 2 for w in class_words)
    assert get_concept("pip").words == ("<pip1>", "<pip2>")
    assert get_concept("pip").initializers == ("<rand-0.013>", "circle")
    assert get_concept("pip").initializers_from("random") == ("<rand-0.013>", "circle")
    assert get_concept("moss").initializers_from("colour") == ("green", "square")
    with pytest.raises(ValueError, match="first_word 'shape'"):
        get_concept("pip").initializers_from("shape")


def test_concept_folder_is_readable_by_the_trainer(tmp_path):
    concept = get_concept("nova")
    folder = write_concept_folder(concept, tmp_path / "nova", n_images=8, seed=0)
    examples = scan_concept_folder(folder.images, folder.masks)
    assert len(examples) == 8
    assert all(CONCEPT_PLACEHOLDER in e.caption for e in examples)
    assert len({e.caption for e in examples}) > 4  # positions and backgrounds vary
    dataset = ConceptDataset(examples, 64, "<nova1> <nova2>", flip_p=0.0)
    sample = dataset.sample(0, torch.Generator().manual_seed(0))
    assert sample["pixel_values"].shape == (3, 64, 64)
    assert 0.02 < sample["mask"].mean() < 0.5
    assert "<nova1> <nova2>" in sample["caption"]
    info = json.loads((folder.root / "concept.json").read_text())
    assert info["words"] == ["<nova1>", "<nova2>"] and info["class_word"] == "star"
    # Same seed, same files; the folder is replaced, not merged.
    again = write_concept_folder(concept, tmp_path / "nova", n_images=6, seed=0)
    assert len(scan_concept_folder(again.images, again.masks)) == 6
    assert (again.images / "00.png").read_bytes() == (tmp_path / "nova" / "images" / "00.png").read_bytes()


def test_concept_training_images_cover_every_size():
    # Three-region layouts draw small objects: a concept never trained small lost its identity there.
    for concept in CONCEPTS:
        assert {scene.objects[0].size for scene in concept_scenes(concept, n_images=3, seed=0)} == set(SIZES)


def test_a_moved_object_looks_like_a_render_of_its_target():
    # Cut out, shrunk and moved, a concept is nearly the pixels the renderer draws at the target's size and place.
    for name, source_size in (("rex", "medium"), ("moss", "large"), ("tula", "medium")):
        concept = get_concept(name)
        source = concept.object("left", "top", source_size, accessory="hat")
        image, masks = render_with_masks(Scene("navy", (source,)))
        target = concept.object("right", "bottom", "small", accessory="hat", offset=(0.02, -0.01))
        moved, moved_mask = moved_object(image, masks[0], source, target, "white")
        expected, expected_masks = render_with_masks(Scene("white", (target,)))
        overlap = (moved_mask & expected_masks[0]).sum() / (moved_mask | expected_masks[0]).sum()
        assert overlap > 0.85, (name, overlap)
        difference = np.abs(np.asarray(moved, dtype=np.float32) - np.asarray(expected, dtype=np.float32))
        assert difference.mean() < 3.0, (name, difference.mean())
    with pytest.raises(ValueError, match="one square size"):
        moved_object(image, masks[0][:10], source, target, "white")


def test_zoomed_out_copies_are_small_moved_and_captioned():
    concept = get_concept("nova")
    plain = training_images(concept, n_images=8, seed=3)
    items = training_images(concept, n_images=8, seed=3, zoomed_out=9)
    assert len(items) == 17
    for (image, mask, text), (same_image, same_mask, same_text) in zip(plain, items):
        assert image.tobytes() == same_image.tobytes() and (mask == same_mask).all() and text == same_text
    copies = zoomed_out_scenes(concept, concept_scenes(concept, 8, 3), 9, seed=3)
    assert {(s.objects[0].column, s.objects[0].row) for _, s in copies} == {(c, r) for c in COLUMNS for r in ROWS}
    for (source, scene), (image, mask, text) in zip(copies, items[8:]):
        assert concept_scenes(concept, 8, 3)[source].objects[0].size != "small"
        assert text == caption(scene, {0: "<TOK>"}) and text.startswith("a small <TOK>")
        assert np.asarray(image)[0, 0].tolist() == list(BACKGROUNDS[scene.background])
        assert 0.5 < mask.sum() / render_with_masks(scene)[1][0].sum() < 1.5
    assert zoomed_out_scenes(concept, concept_scenes(concept, 8, 3), 0) == []
    with pytest.raises(ValueError, match="must not be negative"):
        zoomed_out_scenes(concept, concept_scenes(concept, 8, 3), -1)


def test_concept_folder_holds_the_zoomed_out_copies(tmp_path):
    folder = write_concept_folder(get_concept("pip"), tmp_path / "pip", n_images=6, seed=1, zoomed_out=4)
    examples = scan_concept_folder(folder.images, folder.masks)
    assert len(examples) == 10
    assert sum(e.caption.startswith("a small <TOK>") for e in examples) >= 4


def test_concept_scenes_always_hold_a_concept():
    rng = np.random.default_rng(0)
    for _ in range(30):
        scene, picks = random_concept_scene(rng)
        assert len(picks) == len(scene.objects) and max(picks) >= 0
        for obj, pick in zip(scene.objects, picks):
            assert (obj.emblem is not None) == (pick >= 0)


# ---------------------------------------------------------------------------------------------------------------
# Rendered sets, crops, classifier.


def test_regional_layouts_give_each_object_its_caption_and_band():
    rendered = render_set(40, seed=1)
    tokenizer = load_clip_tokenizer()
    layouts = toyworld_train.regional_scenes(rendered, tokenizer, (16, 16), torch.device("cpu"))
    assert sorted(layout.masks.shape[0] for layout in layouts) == [2, 3]
    for layout in layouts:
        assert torch.allclose(layout.masks.sum(0), torch.ones(16, 16))  # the bands tile the image
        for row, scene in enumerate(layout.scenes.tolist()):
            columns, captions = rendered.object_columns[scene], rendered.object_captions[scene]
            assert len(columns) == layout.masks.shape[0] and list(columns) == sorted(columns, key=COLUMNS.index)
            expected = toyworld_train.tokenize(tokenizer, list(captions), torch.device("cpu"))
            assert torch.equal(layout.region_ids[row], expected)
        assert layout.masks[-1, :, -1].eq(1).all() and layout.masks[0, :, 0].eq(1).all()


def test_render_set_does_not_depend_on_workers():
    one = render_set(24, seed=5, kind="concepts", workers=1, chunk=8)
    two = render_set(24, seed=5, kind="concepts", workers=2, chunk=8)
    assert np.array_equal(one.images, two.images) and one.captions == two.captions
    assert np.array_equal(one.labels, two.labels) and np.array_equal(one.boxes, two.boxes)
    assert one.labels.shape[1] == 1 + len(LABELS)
    assert (one.labels[:, -1] > 0).any()  # concept objects are labelled
    for row in one.labels:
        text = one.captions[row[0]]
        assert LABELS["shape"][row[1]] in text and LABELS["background"][row[5]] in text


def test_full_box_crop_is_the_image():
    images = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    assert torch.allclose(crop_boxes(images, boxes, 16, scale=1.0), images, atol=1e-5)


def test_classifier_predicts_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = AttributeClassifier().eval()
    rendered = render_set(4, seed=0)
    predictions = model.predict([render(s) for s in _scenes(3)])
    assert len(predictions) == 3
    assert all(p[name] in classes for p in predictions for name, classes in LABELS.items())
    images = images_to_tensor(rendered.images).float() / 127.5 - 1
    by_box = model.predict(images[rendered.labels[:, 0]], torch.from_numpy(rendered.boxes))
    assert len(by_box) == len(rendered.boxes)
    loaded = load_classifier(save_classifier(model, tmp_path / "c.safetensors"))
    crops = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for name, logits in model(crops).items():
            assert torch.allclose(loaded(crops)[name], logits, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# Training script.


def test_command_line_budgets():
    config = config_from_args(["--steps", "7", "--unet-steps", "9", "--device", "cpu", "--minutes", "3.5"])
    assert (config.vae_steps, config.text_steps, config.unet_steps, config.classifier_steps) == (7, 7, 9, 7)
    assert config.minutes == 3.5
    smoke = config_from_args(["--smoke", "--unet-batch", "2"])
    assert smoke.unet_batch == 2 and smoke.scenes == ToyWorldTrainConfig.smoke().scenes
    with pytest.raises(ValueError, match="unet_batch 0"):
        ToyWorldTrainConfig(unet_batch=0)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_classifier_crops_come_from_reconstructions_by_their_share(monkeypatch, share):
    rendered = render_set(6, seed=0)
    images = images_to_tensor(rendered.images)
    boxes, labels = torch.from_numpy(rendered.boxes), torch.from_numpy(rendered.labels)
    drawn = []

    def spy(sources, boxes, scenes, index, generator):
        drawn.append((len(sources), scenes.clone()))
        return crops(sources, boxes, scenes, index, generator)

    crops = toyworld_train._classifier_crops
    monkeypatch.setattr(toyworld_train, "_classifier_crops", spy)
    config = ToyWorldTrainConfig.smoke(classifier_reconstructed=share, classifier_steps=3, quiet=True)
    toyworld_train.train_classifier(AttributeClassifier(), images, boxes, labels, config, None, False,
                                    torch.Generator().manual_seed(0), reconstructed=255 - images)
    assert len(drawn) == 3
    for sources, scenes in drawn:
        assert sources == 2 * len(images)
        assert bool((scenes >= len(images)).all()) if share else bool((scenes < len(images)).all())
    with pytest.raises(ValueError, match="classifier_reconstructed 1.5"):
        ToyWorldTrainConfig(classifier_reconstructed=1.5)


def test_a_missing_init_folder_is_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no toy-world model here"):
        train_main(["--smoke", "--quiet", "--init", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_smoke_run_writes_a_loadable_pipeline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "toyworld"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke", "--quiet", "--unet-regional", "0.5", "--out", str(out)])
    runpy.run_path(str(SCRIPT), run_name="__main__")

    weights = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    assert weights <= 20e6
    report = json.loads((out / "training_report.json").read_text())
    assert set(report["stages"]) == {"vae", "text_encoder", "unet", "classifier"}
    assert all(stage["steps"] == 2 for stage in report["stages"].values())

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    assert len(pipe.tokenizer) == 49408 and pipe.text_encoder.config.vocab_size == 49408
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on the left, white background", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    prediction = load_classifier(out / "classifier.safetensors").predict(image)[0]
    assert prediction["shape"] in SHAPES

    # Continuing from that folder with no steps gives back the same weights.
    again = tmp_path / "again"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--smoke", "--quiet", "--steps", "0", "--sample-steps", "0",
                                      "--init", str(out), "--out", str(again)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    from safetensors.torch import load_file

    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "classifier.safetensors"):
        first, second = load_file(str(out / name)), load_file(str(again / name))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
