"""The `mixofshow` command end to end on a tiny base model folder: train, inspect, sample, import-official."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_train import make_concept_folder

from mixofshow.cli import main
from mixofshow.concept_file import load_concept
from mixofshow.testing import save_tiny_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "tiny")


def test_train_inspect_sample(base, tmp_path, capsys):
    data, masks = make_concept_folder(tmp_path)
    out = tmp_path / "hina.safetensors"
    config = tmp_path / "train.yaml"
    config.write_text(f"base: {base}\ndata: {data}\nresolution: 32\nvalidation_steps: 0\n")
    code = main(["--quiet", "train", str(config), "--masks", str(masks), "--words", "<hina1>+<hina2>",
                 "--init", "<rand-0.013>+girl", "--steps", "2", "--out", str(out)])
    assert code == 0 and out.is_file()

    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "<hina1>: 7 layer-wise embedding(s) of size 32" in shown and "rank 4" in shown

    image = tmp_path / "x.png"
    code = main(["--quiet", "sample", "--base", str(base), "--concept", str(out), "--scale", "0.7",
                 "--prompt", "a <hina1> <hina2> near the sea", "--steps", "2", "--out", str(image)])
    assert code == 0
    assert Image.open(image).size == (32, 32)
    again = tmp_path / "y.png"
    main(["--quiet", "sample", "--base", str(base), "--concept", str(out), "--scale", "0.7",
          "--prompt", "a <hina1> <hina2> near the sea", "--steps", "2", "--out", str(again)])
    assert image.read_bytes() == again.read_bytes(), "the same seed must give the same image"


def test_train_with_feed_forward_lora(base, tmp_path):
    data, masks = make_concept_folder(tmp_path)
    out = tmp_path / "ff.safetensors"
    code = main(["--quiet", "train", "--base", str(base), "--data", str(data), "--masks", str(masks), "--words",
                 "<ff1>", "--steps", "1", "--resolution", "32", "--validation-steps", "0", "--unet-lora-layers",
                 "attention_ff", "--out", str(out)])
    assert code == 0
    layers = load_concept(out).unet_lora
    assert any(path.endswith(".ff.net.2") for path in layers) and any(".attn2." in path for path in layers)


def test_sample_several_images_and_scheduler(base, tmp_path):
    out = tmp_path / "cat.png"
    code = main(["--quiet", "sample", "--base", str(base), "--prompt", "a cat", "--steps", "2", "--num-images",
                 "2", "--scheduler", "euler", "--out", str(out)])
    assert code == 0
    assert (tmp_path / "cat_0.png").is_file() and (tmp_path / "cat_1.png").is_file()


def test_sample_a_layout_with_its_preview(base, tmp_path, capsys):
    layout = tmp_path / "scene.yaml"
    layout.write_text("prompt: two friends\nwidth: 32\nheight: 32\nsteps: 2\nseed: 1\nregions:\n"
                      "  - {prompt: a red cat, box: [0, 0, 0.5, 1]}\n  - {prompt: a dog, box: [16, 0, 32, 32]}\n")
    out = tmp_path / "scene.png"
    assert main(["--quiet", "sample", "--base", str(base), "--layout", str(layout), "--out", str(out), "--seed",
                 "14", "--save-layout-preview"]) == 0
    assert out.is_file() and (tmp_path / "scene.layout.png").is_file()
    layout.write_text("prompt: two friends\nregions:\n  - {prompt: a <nobody1>, box: [0, 0, 0.5, 1]}\n")
    capsys.readouterr()
    assert main(["--quiet", "sample", "--base", str(base), "--layout", str(layout), "--out", str(out)]) == 2
    assert "<nobody1>" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--prompt", "x"], "exactly one of --model"),
        (["sample", "--base", "BASE"], "exactly one of --prompt"),
        (["sample", "--base", "BASE", "--prompt", "x", "--layout", "scene.yaml"], "exactly one of --prompt"),
        (["sample", "--base", "BASE", "--layout", "/nowhere/scene.yaml"], "scene.yaml"),
        (["sample", "--base", "BASE", "--concept", "missing.safetensors", "--prompt", "x"], "not found"),
        (["sample", "--base", "BASE", "--prompt", "a <nobody1>", "--steps", "1"], "<nobody1>"),
        (["sample", "--base", "BASE", "--prompt", "x", "--height", "33"], "height"),
        (["sample", "--base", "BASE", "--prompt", "x", "--scheduler", "magic"], "unknown scheduler"),
        (["sample", "--base", "/nowhere/model", "--prompt", "x"], "does not exist"),
        (["sample", "--base", "someone/not-a-model", "--prompt", "x"], "Hugging Face Hub"),
        (["inspect", "missing.safetensors"], "does not exist"),
        (["train", "--base", "BASE", "--data", "/nowhere", "--out", "c.safetensors"], "does not exist"),
        (["train", "--base", "BASE", "--data", "/nowhere", "--out", "c.safetensors", "--steps", "5",
          "--embedding-only-steps", "5"],
         "'embedding_only_steps' (5) must be below 'steps' (5)"),
        (["train", "--base", "BASE", "--data", "/nowhere", "--out", "c.safetensors", "--unet-lora-layers", "all"],
         "'unet_lora_layers' must be one of attention, cross_attention, attention_ff, got 'all'"),
    ],
)
def test_errors_are_one_clear_line(base, args, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = [str(base) if a == "BASE" else a for a in args]
    assert main(["--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_import_official(tmp_path, capsys):
    official = tmp_path / "edlora.pth"
    torch.save({"params": {
        "new_concept_embedding": {"<a1>": torch.randn(7, 32), "<a2>": torch.randn(7, 32)},
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight": torch.randn(4, 32),
                         "text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight": torch.randn(32, 4)},
        "unet": {}}}, official)
    out = tmp_path / "a.safetensors"
    assert main(["import-official", str(official), "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "<a1>: 7 layer-wise" in capsys.readouterr().out
