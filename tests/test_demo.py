"""Tests for `mixofshow demo` and the toy-world scoring it uses (mixofshow.toyworld.evaluate): the demo's fast mode
end to end on a smoke-trained toy folder, and the scoring of rendered ground truth."""

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mixofshow import cli
from mixofshow.concept_file import load_concept
from mixofshow.demo import REGIONS_ALONE, DemoConfig, annotated_grid, load_toy_world, region_prompts
from mixofshow.errors import MixOfShowError
from mixofshow.toyworld import Scene, ToyObject, random_scene, render, render_with_masks
from mixofshow.toyworld.classifier import load_classifier
from mixofshow.toyworld.concepts import CONCEPTS, get_concept, random_concept_scene
from mixofshow.toyworld.evaluate import (
    HEADS,
    Target,
    backgrounds_for,
    binding_summary,
    column_regions,
    composition_target,
    concept_targets,
    find_object,
    mask_box,
    position_of,
    random_targets,
    score_images,
    summarize,
)
from mixofshow.toyworld.models import load_toyworld_pipeline, toyworld_asset_folder
from mixofshow.toyworld.render import COLUMNS, ROWS
from mixofshow.toyworld.train import main as train_toyworld

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    """A toy-world folder from the training script's smoke mode (a few steps: loadable, not useful)."""
    out = tmp_path_factory.mktemp("toyworld") / "smoke"
    torch.set_num_threads(1)
    train_toyworld(["--smoke", "--quiet", "--out", str(out)])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Scoring rendered ground truth.


def _ground_truth(n: int, seed: int = 0) -> list[tuple[Scene, tuple[str | None, ...]]]:
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        if i % 2:
            scene, picks = random_concept_scene(rng)
            scenes.append((scene, tuple(CONCEPTS[p].name if p >= 0 else None for p in picks)))
        else:
            scene = random_scene(rng)
            scenes.append((scene, (None,) * len(scene.objects)))
    return scenes


def test_objects_are_found_where_they_are_drawn():
    hits, total = 0, 0
    for scene, _ in _ground_truth(40):
        image, masks = render_with_masks(scene)
        for obj, mask, region in zip(scene.objects, masks, column_regions(scene)):
            box, truth = find_object(np.asarray(image), region), mask_box(mask)
            assert box is not None
            centre = np.subtract(box[:2], truth[:2]) + np.subtract(box[2:], truth[2:])
            hits += bool(np.all(np.abs(centre) / 2 <= 2 / 64))  # box centre within two pixels
            total += 1
            assert position_of(box, obj) == (obj.column, obj.row)
    assert hits / total >= 0.9


def test_empty_region_has_no_object():
    image = np.asarray(render(Scene("mint", (ToyObject("star", "red", column="left"),))))
    assert find_object(image, (0.0, 0.0, 1.0, 1.0)) is not None
    assert find_object(image, (0.6, 0.0, 1.0, 1.0)) is None


def test_an_object_cut_by_lines_of_the_background_colour_is_found_whole():
    image = np.full((64, 64, 3), 245, np.uint8)
    image[20:40, 10:30] = (135, 60, 190)
    image[29, 10:30] = 245  # a white line through a purple square, as a white spiral cuts a purple star
    image[20:40, 24] = 245
    assert find_object(image) == (10 / 64, 20 / 64, 30 / 64, 40 / 64)


def test_shipped_classifier_knows_every_concept_at_every_size_place_and_background():
    """Strict identity (concept, shape and colour) of every concept drawn alone at every size and position, the
    backgrounds in turn, and of every ordered triple side by side (small, as three-region layouts draw them)."""
    classifier = load_classifier()
    targets = []
    for concept in CONCEPTS:
        backgrounds = itertools.cycle(backgrounds_for([concept.colour]))
        for size, column, row in itertools.product(("small", "medium", "large"), COLUMNS, ROWS):
            targets.append(Target(Scene(next(backgrounds), (concept.object(column, row, size),)), (concept.name,)))
    triples = [composition_target(triple) for triple in itertools.permutations(CONCEPTS, 3)]
    for group in (targets, triples):
        scores = score_images(classifier, [render(t.scene) for t in group], group)
        assert summarize(scores)["identity_strict"] >= 0.99, summarize(scores)


def test_column_regions_split_between_objects():
    one = Scene("white", (ToyObject("circle", "red", column="right"),))
    assert column_regions(one) == ((0.0, 0.0, 1.0, 1.0),)
    two = Scene("white", (ToyObject("circle", "red", column="left"), ToyObject("star", "blue", column="right")))
    assert column_regions(two) == ((0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0))
    three = composition_target([get_concept(n) for n in ("pip", "nova", "moss")])
    assert [round(r[2], 2) for r in three.regions] == [0.35, 0.65, 1.0]
    masks = region_prompts(three, 64).masks
    assert torch.equal(masks.sum(0), torch.ones(64, 64))  # the three regions tile the image


def test_a_composition_part_is_its_object_alone_with_the_region_prompt():
    three = composition_target([get_concept(n) for n in ("pip", "nova", "moss")])
    part = three.part(1)
    assert part.scene.objects == (three.scene.objects[1],) and part.scene.background == three.scene.background
    assert part.concepts == ("nova",) and part.regions == ((0.0, 0.0, 1.0, 1.0),)
    assert part.prompt() == three.region_prompt(1) == "a small <nova1> <nova2> in the center, " \
        f"{three.scene.background} background"


class Oracle:
    """A classifier stand-in that answers the truth of the targets, object by object, with planted mistakes."""

    def __init__(self, targets: list[Target], mistakes: dict[tuple[int, int], dict[str, str]]):
        self.planted = []
        for i, target in enumerate(targets):
            for j, obj in enumerate(target.scene.objects):
                answer = {"shape": obj.shape, "colour": obj.colour, "pattern": obj.pattern,
                          "accessory": obj.accessory, "background": target.scene.background,
                          "concept": target.concepts[j] or "none"}
                answer.update(mistakes.get((i, j), {}))
                self.planted.append(answer)
        self.heads = {"concept": ("none", "pip", "nova", "moss", "rex")}

    def predict(self, images, boxes):
        assert len(images) == len(boxes) == len(self.planted)
        return self.planted

    def probabilities(self, images, boxes):
        """Certain answers: probability 1 for the answer's concept."""
        assert len(images) == len(boxes) == len(self.planted)
        concept = torch.zeros(len(self.planted), len(self.heads["concept"]))
        for k, answer in enumerate(self.planted):
            concept[k, self.heads["concept"].index(answer["concept"])] = 1.0
        return {"concept": concept}

    def answers(self, probabilities):
        return self.planted


class AnswersOnly:
    """A classifier with `predict` only (no probabilities: soft metrics are NaN)."""

    def __init__(self, classifier):
        self.predict = classifier.predict


def test_scores_compare_the_classifier_with_the_target():
    targets = concept_targets(get_concept("pip"), 3) + [composition_target([get_concept("pip"), get_concept("nova"),
                                                                              get_concept("moss")])]
    images = [render(t.scene) for t in targets]
    mistakes = {(0, 0): {"shape": "star"}, (1, 0): {"colour": "pink"}, (3, 0): {"concept": "nova"},
                (3, 1): {"concept": "pip"}}
    scores = score_images(Oracle(targets, mistakes), images, targets)
    assert len(scores) == 3 + 3 and all(s.correct["found"] and s.correct["position"] for s in scores)
    summary = summarize(scores)
    assert summary["shape"] == pytest.approx(5 / 6) and summary["identity"] == pytest.approx(4 / 6)
    assert summary["identity_p"] == pytest.approx(4 / 6)  # certain answers: the soft score equals the hard one
    assert summary["colour"] == pytest.approx(5 / 6)
    assert summary["identity_strict"] == pytest.approx(2 / 6)  # pip as a star, or pink, is not strictly pip
    assert all(summary[m] == 1.0 for m in ("pattern", "accessory", "background"))
    regions = [s for s in scores if s.image == 3]
    binding = binding_summary(regions, targets)
    assert binding == {"binding": pytest.approx(1 / 3), "binding_p": pytest.approx(1 / 3), "all_bound": 0.0,
                       "swapped": pytest.approx(2 / 3)}
    alone = binding_summary([s for s in scores if s.image < 3], targets)  # single objects: the binding ceiling
    assert alone["binding"] == pytest.approx(1.0) and math.isnan(alone["all_bound"]) and math.isnan(alone["swapped"])
    assert summarize([])["identity"] != summarize([])["identity"]  # NaN without scores
    unsure = summarize(score_images(AnswersOnly(Oracle(targets, mistakes)), images, targets))
    assert unsure["identity"] == pytest.approx(4 / 6) and math.isnan(unsure["identity_p"])


def test_a_missing_object_is_scored_where_it_should_be():
    target = concept_targets(get_concept("nova"), 1)[0]
    blank = Scene(target.scene.background, (ToyObject("circle", "red", column="left"),))
    empty = np.asarray(render(blank)).copy()
    empty[:] = empty[0, -1]  # only background
    (score,) = score_images(Oracle([target], {}), [empty], [target])
    assert score.box is None and not score.correct["found"] and not score.correct["position"]


def test_targets_check_their_fields():
    scene = Scene("white", (ToyObject("circle", "red"),))
    assert Target(scene).prompt() == "a red circle in the center, white background"
    assert Target(scene, ("pip",)).prompt() == "a <pip1> <pip2> in the center, white background"
    assert Target(scene, ("pip",)).prompt({"pip": "<pip1~2> <pip2~2>"}).startswith("a <pip1~2> <pip2~2> in")
    with pytest.raises(ValueError, match="needs 1 concepts"):
        Target(scene, ("pip", "nova"))
    with pytest.raises(ValueError, match="unknown toy concept"):
        Target(scene, ("nobody",))
    with pytest.raises(ValueError, match="region"):
        Target(scene, regions=((0.5, 0.0, 0.2, 1.0),))
    composition = composition_target([get_concept("pip"), get_concept("nova")])
    assert composition.region_prompt(1) == "a <nova1> <nova2> on the right, " + composition.scene.background + \
        " background"
    assert len(random_targets(5, seed=3)) == 5 and random_targets(5, seed=3) == random_targets(5, seed=3)


def test_shipped_base_model_loads_offline_and_follows_a_prompt(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, components, classifier = load_toy_world()
    assert folder == toyworld_asset_folder() and (folder / "TRAINING.md").is_file()
    assert components["unet"].dtype == torch.float32  # stored in fp16, loaded as float32
    assert sum(p.stat().st_size for p in folder.rglob("*.safetensors")) <= 20e6
    pipe = load_toyworld_pipeline()
    pipe.set_progress_bar_config(disable=True)
    target = Target(Scene("white", (ToyObject("circle", "red", column="center", row="middle", size="large"),)))
    images = pipe([target.prompt()] * 4, height=64, width=64, num_inference_steps=20, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0)).images
    summary = summarize(score_images(classifier, images, [target] * 4))
    assert summary["shape"] >= 0.75 and summary["background"] >= 0.75, summary


def test_shipped_classifier_scores_rendered_ground_truth():
    classifier = load_classifier()
    scenes = _ground_truth(200, seed=7)
    targets = [Target(scene, concepts) for scene, concepts in scenes]
    summary = summarize(score_images(classifier, [render(t.scene) for t in targets], targets))
    for metric in ("found", "identity", *HEADS, "position"):
        assert summary[metric] > 0.95, (metric, summary)
    assert 0.9 < summary["identity_p"] <= 1.0, summary


# ---------------------------------------------------------------------------------------------------------------
# The demo.


def test_demo_fast_writes_the_report(toy_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["--quiet", "demo", "--fast", "--base", str(toy_folder), "--out", str(out),
                     "--detail-strength", "0.85"]) == 0
    assert "identity" in capsys.readouterr().out

    page = (out / "index.html").read_text()
    assert page.count("<table>") >= 4
    for heading in ("identity", "shape", "colour", "background", "position", "binding", "own model",
                    "weight fusion", "gradient fusion"):
        assert heading in page
    for source in re.findall(r"<img src='([^']+)'>", page):
        assert (out / source).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["single_concept"]) == {"own model", "weight fusion", "gradient fusion"}
    assert set(metrics["composition"]) == {REGIONS_ALONE, "weight fusion", "gradient fusion",
                                           "weight fusion, detailed", "gradient fusion, detailed"}
    assert "detail pass" in page
    assert 0.0 <= metrics["composition"][REGIONS_ALONE]["binding"] <= 1.0
    assert metrics["composition"][REGIONS_ALONE]["all_bound"] is None  # undefined for single objects
    json.loads((out / "metrics.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert 0.0 <= metrics["single_concept"]["gradient fusion"]["identity"] <= 1.0
    assert sorted(p.name for p in (out / "concepts").glob("*.safetensors")) == [
        "moss.edlora.safetensors", "nova.edlora.safetensors", "pip.edlora.safetensors"]
    for method in ("weight", "gradient"):
        assert (out / "fused" / method / "model_index.json").is_file()


def test_toy_tuning_reaches_the_training_config(toy_folder, tmp_path):
    from mixofshow.demo import ToyTuning, tune_concept

    _, components, _ = load_toy_world(toy_folder)
    # values unlike both ToyTuning's and the training config's defaults, so a dropped field shows
    tuning = ToyTuning(steps=2, batch_size=1, images=2, zoomed_out=3, lr_embedding=7e-3, lr_unet=9e-4,
                       embedding_norm_limit=0.31, embedding_only_steps=1, rank=2, first_word="colour")
    concept = load_concept(tune_concept(get_concept("pip"), toy_folder, components, tmp_path, tuning, progress=False))
    for name in ("steps", "batch_size", "lr_embedding", "lr_text_encoder", "lr_unet", "embedding_norm_limit",
                 "embedding_only_steps", "rank"):
        assert concept.config[name] == getattr(tuning, name), name
    assert concept.initializers == ("red", "circle")
    assert len(list((tmp_path / "data" / "pip" / "images").glob("*.png"))) == 2 + 3  # rendered + zoomed out


def test_toy_fusion_samples_its_statistics_prompts(toy_folder, tmp_path):
    from mixofshow.demo import TOY_FUSION_PROMPTS, TOY_STATISTICS_PROMPTS, ToyTuning, fuse_concepts, tune_concept

    _, components, _ = load_toy_world(toy_folder)
    tuning = ToyTuning(steps=1, batch_size=1, images=2, embedding_only_steps=0)
    concept = tune_concept(get_concept("pip"), toy_folder, components, tmp_path / "pip", tuning, progress=False)
    for templates in (TOY_STATISTICS_PROMPTS[:TOY_FUSION_PROMPTS], TOY_STATISTICS_PROMPTS[:3]):
        kwargs = {} if len(templates) == TOY_FUSION_PROMPTS else {"sampling_templates": templates}
        out = fuse_concepts([concept], toy_folder, components, tmp_path / f"fused{len(templates)}", "gradient",
                            sampling_steps=1, progress=False, **kwargs)
        report = json.loads((out / "fusion_report.json").read_text())
        assert tuple(report["config"]["sampling_templates"]) == templates
        assert [item["unet_scale"] for item in report["inputs"]] == [1.0]  # one concept: its tuned strength


def test_toy_fusion_boosts_the_unet_loras_from_three_concepts(toy_folder, tmp_path):
    from mixofshow.demo import TOY_FUSION_BOOST_FROM, TOY_FUSION_UNET_SCALE, ToyTuning, fuse_concepts, tune_concept

    _, components, _ = load_toy_world(toy_folder)
    tuning = ToyTuning(steps=1, batch_size=1, images=2, embedding_only_steps=0)
    files = [tune_concept(get_concept(name), toy_folder, components, tmp_path / name, tuning, progress=False)
             for name in ("pip", "rex", "nova")]
    for n in (TOY_FUSION_BOOST_FROM - 1, TOY_FUSION_BOOST_FROM):
        out = fuse_concepts(files[:n], toy_folder, components, tmp_path / f"fused{n}", "weight", progress=False)
        report = json.loads((out / "fusion_report.json").read_text())
        expected = TOY_FUSION_UNET_SCALE if n >= TOY_FUSION_BOOST_FROM else 1.0
        assert [item["unet_scale"] for item in report["inputs"]] == [expected] * n
    out = fuse_concepts(files[:1], toy_folder, components, tmp_path / "fused-set", "weight", unet_scale=2.0,
                        progress=False)
    assert json.loads((out / "fusion_report.json").read_text())["inputs"][0]["unet_scale"] == 2.0


def test_demo_without_a_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mixofshow.demo.toyworld_asset_folder", lambda: tmp_path / "nothing")
    with pytest.raises(MixOfShowError, match="train_toyworld"):
        load_toy_world()
    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--base", str(tmp_path)]) == 2
    assert "no toy-world model" in capsys.readouterr().err


def test_toy_tuning_checks_its_fields():
    from mixofshow.demo import ToyTuning

    with pytest.raises(ValueError, match="first_word 'shape': choose one of random, colour"):
        ToyTuning(first_word="shape")
    with pytest.raises(ValueError, match=r"embedding_only_steps 5 must be within \[0, steps 5\)"):
        ToyTuning(steps=5, embedding_only_steps=5)


def test_demo_config_checks_its_fields():
    with pytest.raises(ValueError, match="exactly three"):
        DemoConfig(out="x", concepts=("pip", "nova"))
    with pytest.raises(ValueError, match="unknown toy concept"):
        DemoConfig(out="x", concepts=("pip", "nova", "nobody"))
    assert DemoConfig.fast("x").tuning.steps < DemoConfig("x").tuning.steps
    with pytest.raises(ValueError, match="detail_strength 1.5 must be from 0"):
        DemoConfig(out="x", detail_strength=1.5)
    assert DemoConfig("x").detail_strength == 0.0  # off: it lowers binding with the default concepts


def test_demo_refuses_a_bad_detail_strength_before_any_work(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "out"), "--detail-strength", "-1"]) == 2
    assert "detail_strength -1.0 must be from 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_grid_outlines_found_objects():
    targets = concept_targets(get_concept("pip"), 2)
    images = [render(t.scene) for t in targets]
    scores = score_images(Oracle(targets, {(1, 0): {"concept": "rex"}}), images, targets)
    grid = annotated_grid([images], [scores], scale=2, gap=2)
    assert grid.size == (2 * (128 + 2) + 2, 128 + 4)
    pixels = np.asarray(grid)
    assert (pixels == (40, 200, 60)).all(-1).any() and (pixels == (230, 40, 40)).all(-1).any()


def test_sampling_noise_depends_on_target_and_sample_only(toy_folder):
    from mixofshow.demo import concept_pipeline, sample_targets

    _, components, _ = load_toy_world(toy_folder)
    pipe = concept_pipeline(components, [])
    targets = random_targets(2, seed=1)
    settings = {"steps": 2, "guidance": 5.0, "seed": 3, "progress": False}
    together = sample_targets(pipe, targets, 2, batch_size=3, **settings)
    alone = sample_targets(pipe, targets[:1], 2, **settings)
    assert [len(group) for group in together] == [2, 2]
    for a, b in zip(together[0], alone[0]):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(together[0][0]), np.asarray(together[0][1]))
