"""ED-LoRA training on tiny random models: loss goes down, only the concept changes, files and resume are exact."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image, ImageDraw

from mixofshow import MixOfShowError, MixOfShowPipeline, load_concept
from mixofshow import train as training
from mixofshow.config import load_train_config
from mixofshow.lora import lora_layers
from mixofshow.testing import tiny_components
from mixofshow.train import EDLoRATrainer, train


def make_concept_folder(root, count=3, size=(40, 36), caption="a photo of <TOK>, red, on blue"):
    data, masks = root / "data", root / "masks"
    data.mkdir()
    masks.mkdir()
    for i in range(count):
        image = Image.new("RGB", size, (20 * i, 90, 200))
        ImageDraw.Draw(image).ellipse((5, 5, 28, 30), fill=(240, 40, 40))
        image.save(data / f"img{i}.png")
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse((5, 5, 28, 30), fill=255)
        mask.save(masks / f"img{i}.png")
        (data / f"img{i}.txt").write_text(caption)
    return data, masks


def config(tmp_path, **fields):
    data, masks = (tmp_path / "data", tmp_path / "masks")
    if not data.exists():
        make_concept_folder(tmp_path)
    values = {"base": "unused", "data": str(data), "masks": str(masks), "out": str(tmp_path / "concept.safetensors"),
                  "words": ["<hina1>", "<hina2>"], "init": ["<rand-0.013>", "girl"], "steps": 4, "resolution": 32,
                  "validation_steps": 0}
    values.update(fields)
    return load_train_config(None, **values)


def test_short_run_lowers_the_masked_loss(tmp_path):
    cfg = config(tmp_path, steps=30, lr_unet=1e-2, lr_text_encoder=1e-3, lr_embedding=1e-2, lr_schedule="constant")
    trainer = EDLoRATrainer(cfg, components=tiny_components())
    before = trainer.evaluation_loss()
    for _ in range(cfg.steps):
        trainer.train_step()
    assert trainer.evaluation_loss() < 0.9 * before


@pytest.mark.parametrize("masks", [True, False])
def test_zoomed_out_crops_train_on_the_image_not_the_canvas(tmp_path, monkeypatch, masks):
    # A zoomed-out crop's black canvas is outside the loss, with or without mask files
    cfg = config(tmp_path, zoom_out_p=1.0, zoom_out_min=0.5, **({} if masks else {"masks": None}))
    trainer = EDLoRATrainer(cfg, components=tiny_components())
    batch = trainer.dataset.batch([0, 1, 2], torch.Generator().manual_seed(0))
    canvas = (batch["pixel_values"] == -1).all(dim=1, keepdim=True)
    assert canvas.any() and not batch["mask"][canvas].any()
    if not masks:
        assert batch["mask"].bool().equal(~canvas)
    loss_masks, loss = [], training.masked_diffusion_loss
    monkeypatch.setattr(training, "masked_diffusion_loss", lambda *args: loss_masks.append(args[2]) or loss(*args))
    trainer.train_step()
    assert (loss_masks[0] == 0).any()  # without mask files too: the canvas is left out


def test_only_concept_rows_and_lora_change(tmp_path):
    components = tiny_components()
    frozen = {name: {k: v.clone() for k, v in components[name].state_dict().items()}
              for name in ("unet", "text_encoder", "vae")}
    base_vocab = components["tokenizer"].vocab_size
    trainer = EDLoRATrainer(config(tmp_path), components=components)
    initial_rows = trainer.embedding.rows.detach().clone()
    while trainer.step < trainer.config.steps:
        trainer.train_step()
    assert not torch.equal(trainer.embedding.rows, initial_rows)
    assert any(not torch.equal(a, torch.zeros_like(a)) for _, a in trainer.concept().unet_lora.values())

    for name, before in frozen.items():
        model = components[name]
        modules = dict(model.named_modules())
        for key, tensor in before.items():
            module_path, _, leaf = key.rpartition(".")
            module = modules.get(module_path)
            if module is None:  # PEFT moved this weight under `<path>.base_layer`
                module = modules[f"{module_path}.base_layer"]
            if name == "text_encoder" and key.endswith("token_embedding.weight"):
                module, after = trainer.embedding.base, trainer.embedding.base.weight[:base_vocab]
                assert torch.equal(after, tensor[:base_vocab]), "a base token embedding changed"
                continue
            assert torch.equal(getattr(module, leaf), tensor), f"{name}.{key} changed"


def test_concept_file_loads_into_a_pipeline(tmp_path):
    path = train(config(tmp_path), components=tiny_components(), progress=False)
    concept = load_concept(path)
    assert concept.words == ("<hina1>", "<hina2>")
    assert concept.embeddings["<hina1>"].shape == (7, 32)
    assert concept.rank == 4 and concept.alpha == 4.0
    pipe = MixOfShowPipeline(**tiny_components())
    pipe.load_concept(path, scale=0.7)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a photo of <hina1> <hina2>", num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(latents).all()


def test_plain_lora_mode_has_one_embedding_per_word(tmp_path):
    path = train(config(tmp_path, mode="lora"), components=tiny_components(), progress=False)
    concept = load_concept(path)
    assert concept.mode == "lora"
    assert {w: tuple(e.shape) for w, e in concept.embeddings.items()} == {"<hina1>": (1, 32), "<hina2>": (1, 32)}


def test_validation_grid_is_written(tmp_path):
    path = train(config(tmp_path, steps=1, validation_steps=2), components=tiny_components(), progress=False)
    grid = Image.open(path.with_suffix(".validation.png"))
    assert grid.size == (2 * 32, 3 * 32)  # seeds x LoRA scales 0 / 0.7 / 1.0


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = config(tmp_path, steps=6, checkpoint_every=3)
    full = load_concept(train(cfg, components=tiny_components(), progress=False))
    checkpoint = tmp_path / "concept.checkpoints" / "step_000003.safetensors"
    assert checkpoint.is_file()

    resumed_trainer = EDLoRATrainer(cfg, components=tiny_components(), resume="latest")
    assert resumed_trainer.step == 3
    resumed = load_concept(resumed_trainer.run(progress=False))
    for word in full.words:
        torch.testing.assert_close(resumed.embeddings[word], full.embeddings[word], rtol=0, atol=1e-6)
    for part in ("text_encoder_lora", "unet_lora"):
        for module, (down, up) in getattr(full, part).items():
            torch.testing.assert_close(getattr(resumed, part)[module][0], down, rtol=0, atol=1e-6)
            torch.testing.assert_close(getattr(resumed, part)[module][1], up, rtol=0, atol=1e-6)


def test_the_seed_alone_decides_the_run(tmp_path):
    # PEFT draws the initial lora_A from torch's global generator; the run must not depend on its state.
    runs = []
    for global_seed, seed, name in ((1, 0, "a"), (2, 0, "b"), (1, 3, "c")):
        components = tiny_components()
        torch.manual_seed(global_seed)
        cfg = config(tmp_path, steps=2, seed=seed, out=str(tmp_path / f"{name}.safetensors"))
        runs.append(load_concept(train(cfg, components=components, progress=False)).unet_lora)
    for module, (down, up) in runs[0].items():
        torch.testing.assert_close(runs[1][module][0], down, rtol=0, atol=0)
        torch.testing.assert_close(runs[1][module][1], up, rtol=0, atol=0)
    assert any(not torch.equal(runs[2][module][0], down) for module, (down, _) in runs[0].items())


def test_cross_attention_lora_touches_only_cross_attention_key_value_and_output(tmp_path):
    cfg = config(tmp_path, steps=2, unet_lora_layers="cross_attention")
    concept = load_concept(train(cfg, components=tiny_components(), progress=False))
    paths = sorted(concept.unet_lora)
    all_attention = sorted(load_concept(train(config(tmp_path, steps=1, out=str(tmp_path / "all.safetensors")),
                                              components=tiny_components(), progress=False)).unet_lora)
    assert paths == [p for p in all_attention if re.search(r"attn2\.(to_k|to_v|to_out\.0)$", p)]
    assert paths and any(not torch.equal(up, torch.zeros_like(up)) for _, up in concept.unet_lora.values())
    assert concept.text_encoder_lora  # the text encoder's LoRA is unchanged by the option


def test_attention_ff_lora_adds_the_feed_forward_layers_to_the_attention_ones(tmp_path):
    concept = load_concept(train(config(tmp_path, steps=2, unet_lora_layers="attention_ff"),
                                 components=tiny_components(), progress=False))
    attention = load_concept(train(config(tmp_path, steps=1, out=str(tmp_path / "attention.safetensors")),
                                   components=tiny_components(), progress=False))
    feed_forward = sorted(set(concept.unet_lora) - set(attention.unet_lora))
    blocks = {p.rsplit(".attn", 1)[0] for p in attention.unet_lora}
    assert set(attention.unet_lora) < set(concept.unet_lora)
    assert feed_forward == sorted(f"{block}.ff.net.{name}" for block in blocks for name in ("0.proj", "2"))
    assert any(not torch.equal(concept.unet_lora[p][1], torch.zeros_like(concept.unet_lora[p][1]))
               for p in feed_forward)


def test_embedding_freeze_at_the_norm_limit(tmp_path):
    # The class word 'girl' starts far above a 0.01 limit: the embeddings freeze at once, LoRA still trains.
    trainer = EDLoRATrainer(config(tmp_path, embedding_norm_limit=0.01), components=tiny_components())
    rows = trainer.embedding.rows.detach().clone()
    assert trainer.embeddings_frozen
    trainer.train_step()
    trainer.train_step()
    assert torch.equal(trainer.embedding.rows, rows)
    assert any(not torch.equal(up, torch.zeros_like(up)) for _, up in trainer.concept().unet_lora.values())


def test_embedding_only_steps_hold_the_loras_then_release_them(tmp_path):
    trainer = EDLoRATrainer(config(tmp_path, embedding_only_steps=2, weight_decay=0.1), components=tiny_components())
    loras = [p.detach().clone() for p in trainer.trainable[1:]]
    rows = trainer.embedding.rows.detach().clone()
    trainer.train_step()
    trainer.train_step()
    assert not torch.equal(trainer.embedding.rows, rows)
    assert all(torch.equal(p, before) for p, before in zip(trainer.trainable[1:], loras))  # no step, no decay
    trainer.train_step()
    assert any(not torch.equal(p, before) for p, before in zip(trainer.trainable[1:], loras))


def test_subject_box_widens_the_mask_bounds_at_the_latent_size():
    mask = torch.zeros(32, 32)
    mask[8:16, 12:20] = 1  # latent 8x8: rows 2-3, columns 3-4
    box = training.subject_box(mask, (8, 8))
    rows, cols = box.any(1).nonzero()[:, 0].tolist(), box.any(0).nonzero()[:, 0].tolist()
    assert rows == [1, 2, 3, 4] and cols == [2, 3, 4, 5] and box.sum() == 16  # one latent pixel of margin
    assert training.subject_box(torch.zeros(32, 32), (8, 8)).eq(1).all()  # no subject: the whole image


def test_regional_steps_put_the_concept_words_on_the_subject_box_only(tmp_path, monkeypatch):
    for folder in ("data", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(2):  # a small subject in the top-left corner
        image, mask = Image.new("RGB", (32, 32), (20, 90, 200)), Image.new("L", (32, 32), 0)
        ImageDraw.Draw(image).ellipse((2, 2, 11, 11), fill=(240, 40, 40))
        ImageDraw.Draw(mask).ellipse((2, 2, 11, 11), fill=255)
        image.save(tmp_path / "data" / f"img{i}.png")
        mask.save(tmp_path / "masks" / f"img{i}.png")
        (tmp_path / "data" / f"img{i}.txt").write_text("a photo of <TOK>, red, on blue")
    trainer = EDLoRATrainer(config(tmp_path, regional_share=1.0, attn_reg_weight=0.0), components=tiny_components())
    prompts, regions = [], []
    layer_input_ids = trainer.vocabulary.layer_input_ids
    monkeypatch.setattr(trainer.vocabulary, "layer_input_ids",
                        lambda tokenizer, batch: prompts.extend(batch) or layer_input_ids(tokenizer, batch))
    region_attention = training.RegionalAttention
    monkeypatch.setattr(training, "RegionalAttention",
                        lambda *args, **kwargs: regions.append(args[1]) or region_attention(*args, **kwargs))
    batch, generator = trainer.batch(0, 0)
    loss, logs = trainer.loss(batch, generator)
    assert logs["regional"] == 1.0
    batch_size, captions = trainer.config.batch_size, batch["captions"]
    per_image = prompts  # per image: its global prompt, then its region prompt (no whole-batch encoding)
    assert len(per_image) == 2 * batch_size
    assert per_image[1::2] == captions and all("<hina1> <hina2>" in c for c in captions)
    assert per_image[0::2] == [c.replace("<hina1> <hina2>", "girl") for c in captions]  # the class word instead
    assert len(regions) == trainer.config.batch_size and all(0 < r.mean() < 1 for r in regions)
    rows_gradient = torch.autograd.grad(loss, trainer.embedding.rows)[0]
    assert rows_gradient.abs().sum() > 0  # the concept learns through its region prompt


def test_gradient_checkpointing_with_attention_regularisation_matches(tmp_path):
    results = []
    for checkpointing in (False, True):
        trainer = EDLoRATrainer(config(tmp_path, gradient_checkpointing=checkpointing, attn_reg_weight=1.0),
                                components=tiny_components())
        assert trainer.use_reg
        loss, logs = trainer.loss(*trainer.batch(0, 0))
        assert logs["attn_reg"] > 0
        loss.backward()
        results.append([p.grad.clone() for p in trainer.trainable])
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def test_attention_regularisation_reaches_the_lora_weights(tmp_path):
    trainer = EDLoRATrainer(config(tmp_path, attn_reg_weight=1.0), components=tiny_components())
    loss, logs = trainer.loss(*trainer.batch(0, 0))
    reg_only = torch.autograd.grad(loss - logs["loss"], trainer.embedding.rows, allow_unused=True)[0]
    assert reg_only is not None and reg_only.abs().sum() > 0
    assert len(lora_layers(trainer.unet)) > 0


# -- bad input: a clear error before training starts, and nothing written --------------------------------------

@pytest.mark.parametrize(
    "fields, message",
    [
        ({"words": ["girl", "<hina2>"]}, "already exists in the tokenizer"),
        ({"init": ["<rand-0.013>", "blue car"]}, "not one"),
        ({"init": ["girl"]}, "one per word"),
        ({"mode": "dreambooth"}, "mode"),
        ({"steps": 0}, "steps"),
        ({"unet_lora_layers": "everything"}, "unet_lora_layers"),
        ({"out": "concept.pth"}, ".safetensors"),
        ({"zoom_out_p": 1.5}, "zoom_out_p"),
        ({"zoom_out_min": 0.0}, "zoom_out_min"),
        ({"embedding_only_steps": 4}, "embedding_only_steps"),
        ({"regional_share": 1.5}, "regional_share"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, fields, message):
    with pytest.raises(MixOfShowError, match=message):
        train(config(tmp_path, **fields), components=tiny_components(), progress=False)
    assert not (tmp_path / "concept.safetensors").exists()


def test_empty_data_folder_fails(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MixOfShowError, match="empty"):
        train(config(tmp_path, data=str(empty), masks=None), components=tiny_components(), progress=False)


def test_caption_without_placeholder_fails(tmp_path):
    make_concept_folder(tmp_path, caption="a photo of a girl")
    with pytest.raises(MixOfShowError, match="<TOK>"):
        train(config(tmp_path), components=tiny_components(), progress=False)


def test_existing_concept_file_survives_a_failed_run(tmp_path):
    out = tmp_path / "concept.safetensors"
    out.write_bytes(b"previous result")
    with pytest.raises(MixOfShowError):
        train(config(tmp_path, words=["girl", "<x2>"]), components=tiny_components(), progress=False)
    assert out.read_bytes() == b"previous result"


def test_unknown_config_field_is_named(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("base: b\ndata: d\nout: o.safetensors\nlearning_rate: 3\n")
    with pytest.raises(MixOfShowError, match="learning_rate"):
        load_train_config(path)
    path.write_text("base: b\ndata: d\nout: o.safetensors\nsteps: many\n")
    with pytest.raises(MixOfShowError, match="'steps'"):
        load_train_config(path)


def test_compiled_unet_gives_the_same_step(tmp_path):
    losses = []
    for compiled in (False, True):
        trainer = EDLoRATrainer(config(tmp_path, compile=compiled), components=tiny_components())
        loss, _ = trainer.loss(*trainer.batch(0, 0))
        loss.backward()
        losses.append((loss.detach(), trainer.embedding.rows.grad.clone()))
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-3, atol=1e-6)
