"""Layouts: loading and checking (files, dicts, every bad input), masks, the official format, preview, CLI, fuzzing."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mixofshow.cli import main
from mixofshow.errors import MixOfShowError
from mixofshow.layout import (
    CONDITION_TYPES,
    LAYOUT_KEYS,
    PALETTE,
    REGION_KEYS,
    SCHEDULER_NAMES,
    Condition,
    Layout,
    Region,
    draw_layout_preview,
    layout_from_official,
    load_layout,
)

WIDTH, HEIGHT = 64, 48
GREY = (128, 128, 128)
OFFICIAL = ("[a <hina1> <hina2>, standing near a lake]-*-[longbody, lowres, bad anatomy]-*-[0, 0, 512, 256]|"
            "[a <kaori1> <kaori2>, girl]-*-[lowres]-*-[0, 256, 512, 512]")


def make_files(folder):
    """Images a layout refers to: a mask (a 16 x 8 block at x 40, y 20), a pose image, and broken ones."""
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)  # (H, W)
    mask[20:28, 40:56] = 255
    mask[0, 0] = 127  # at the threshold: outside
    Image.fromarray(mask).save(folder / "masks" / "girl.png")
    Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0)).save(folder / "pose.png")
    Image.new("L", (WIDTH, HEIGHT), 0).save(folder / "empty.png")
    Image.new("L", (WIDTH + 8, HEIGHT), 255).save(folder / "wide.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return folder


def valid_document() -> dict:
    return {
        "prompt": "two people near the castle",
        "negative_prompt": "lowres, bad anatomy",
        "width": WIDTH,
        "height": HEIGHT,
        "steps": 20,
        "guidance": 7.5,
        "seed": 14,
        "scheduler": "ddim",
        "regions": [
            {"prompt": "a <potter1> <potter2>, in uniform", "negative_prompt": "lowres", "box": [8, 8, 40, 24]},
            {"prompt": "a <hermione1> <hermione2>, girl", "mask": "masks/girl.png", "adapter_weight": 0.8},
        ],
        "conditions": [{"type": "keypose", "model": "TencentARC/t2iadapter_openpose_sd14v1", "image": "pose.png",
                        "weight": 1.0}],
    }


@pytest.fixture
def folder(tmp_path):
    return make_files(tmp_path)


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory):
    """Files for the fuzz tests (hypothesis wants fixtures that outlive one example)."""
    return make_files(tmp_path_factory.mktemp("layout"))


# ---------------------------------------------------------------------------------------------------------------
# Valid layouts


def test_valid_layout_fields(folder):
    layout = load_layout(valid_document(), base_dir=folder)
    assert layout.width == WIDTH and layout.height == HEIGHT and layout.seed == 14 and layout.scheduler == "ddim"
    box, masked = layout.regions
    assert box == Region("a <potter1> <potter2>, in uniform", "lowres", box=(8, 8, 40, 24))
    assert masked.box is None and masked.mask == str(folder / "masks" / "girl.png") and masked.adapter_weight == 0.8
    pose = Condition("keypose", "TencentARC/t2iadapter_openpose_sd14v1", str(folder / "pose.png"))
    assert layout.conditions == (pose,)
    assert layout.region_negative_prompts() == ["lowres", "lowres, bad anatomy"]


def test_defaults():
    layout = load_layout({"prompt": "a castle"})
    assert layout == Layout("a castle")
    assert (layout.width, layout.height, layout.steps, layout.guidance) == (512, 512, 30, 7.5)
    assert layout.region_masks().shape == (0, 512, 512)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trip(folder, tmp_path, monkeypatch, suffix):
    document = valid_document()
    path = folder / f"layout{suffix}"
    path.write_text(json.dumps(document) if suffix == ".json" else _yaml(document))
    monkeypatch.chdir(tmp_path.parent)  # relative paths come from the file's folder, not the working directory
    layout = load_layout(path)
    assert layout == load_layout(document, base_dir=folder)
    for out in (tmp_path / "copies" / "again.yaml", tmp_path / "copies" / "again.json"):
        assert layout.save(out) == out
        assert load_layout(out) == layout
        assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "no temporary file left behind"
    assert load_layout(layout.to_dict()) == layout


def test_isolated_regions_round_trip_and_reach_the_region_prompts(folder):
    from mixofshow.pipelines.regional import RegionPrompts

    layout = load_layout({**valid_document(), "isolate_regions": True}, base_dir=folder)
    assert layout.isolate_regions and layout.to_dict()["isolate_regions"] is True
    assert load_layout(layout.to_dict()) == layout
    assert RegionPrompts.from_layout(layout).isolate
    plain = load_layout(valid_document(), base_dir=folder)
    assert not plain.isolate_regions and "isolate_regions" not in plain.to_dict()
    assert not RegionPrompts.from_layout(plain).isolate


def test_detail_passes_round_trip_with_their_windows(folder):
    document = valid_document()
    document["regions"][0].update(detail_prompt="a <potter1> <potter2>, face close-up", detail_window=[8, 0, 40, 32])
    document["regions"][1]["detail_prompt"] = "a <hermione1> <hermione2>, close-up"
    layout = load_layout({**document, "detail_strength": 0.6}, base_dir=folder)
    boxed, masked = layout.regions
    assert boxed.detail_window == (8, 0, 40, 32) and masked.detail_window is None and layout.detail_strength == 0.6
    assert masked.bounds(WIDTH, HEIGHT) == (40, 20, 56, 28)  # the mask's bounding box
    assert load_layout(layout.to_dict()) == layout
    plain = load_layout(valid_document(), base_dir=folder)
    assert plain.detail_strength == Layout.detail_strength and "detail_strength" not in plain.to_dict()
    assert all(r.detail_prompt is None for r in plain.regions)


def test_to_dict_is_plain_data(folder):
    data = load_layout(valid_document(), base_dir=folder).to_dict()
    assert data["regions"][0]["box"] == [8, 8, 40, 24]
    assert data["regions"][1]["mask"] == str(folder / "masks" / "girl.png")
    assert json.loads(json.dumps(data)) == data


def test_fraction_and_pixel_boxes():
    def box(value):
        return load_layout({"prompt": "p", "width": WIDTH, "height": HEIGHT,
                            "regions": [{"prompt": "r", "box": value}]}).regions[0].box

    assert box([0, 0, 0.5, 1]) == (0, 0, 32, 48)
    assert box([0.0, 0.0, 0.33, 1.0]) == (0, 0, round(0.33 * WIDTH), 48)
    assert box([0, 0, 32, 48]) == (0, 0, 32, 48)
    assert box([0.5, 0, 2, 1]) == (0, 0, 2, 1), "one value above 1: all are pixels, rounded"


def test_region_masks(folder):
    layout = load_layout(valid_document(), base_dir=folder)
    masks = layout.region_masks()
    assert masks.shape == (2, HEIGHT, WIDTH) and masks.dtype.is_floating_point and str(masks.dtype) == "torch.float32"
    expected = np.zeros((2, HEIGHT, WIDTH), np.float32)
    expected[0, 8:24, 8:40] = 1
    expected[1, 20:28, 40:56] = 1
    assert np.array_equal(masks.numpy(), expected)
    assert masks[0].sum() == (40 - 8) * (24 - 8)


def test_local_adapter_model_resolves(folder):
    (folder / "adapters" / "pose").mkdir(parents=True)
    document = valid_document()
    document["conditions"][0]["model"] = "adapters/pose"
    assert load_layout(document, base_dir=folder).conditions[0].model == str(folder / "adapters" / "pose")


def test_scheduler_names_match_the_pipeline():
    from mixofshow.pipelines import SCHEDULERS

    assert tuple(SCHEDULERS) == SCHEDULER_NAMES


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each case is (change to a valid document, text the error must hold)


def _set(path, value):
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return document
    return change


def _drop(path):
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return document
    return change


BAD = {
    "not a mapping": (lambda d: ["prompt", "x"], "must be a mapping"),
    "unknown key": (_set(["colour"], "red"), "'colour'"),
    "unknown region key": (_set(["regions", 0, "boxes"], [0, 0, 1, 1]), "regions[0] has unknown field(s) 'boxes'"),
    "unknown condition key": (_set(["conditions", 0, "scale"], 1), "conditions[0] has unknown field(s) 'scale'"),
    "prompt missing": (_drop(["prompt"]), "prompt is missing"),
    "prompt not a string": (_set(["prompt"], 5), "prompt must be a string, got 5"),
    "prompt a list": (_set(["prompt"], ["a", "b"]), "prompt must be a string"),
    "negative prompt null": (_set(["negative_prompt"], None), "negative_prompt must be a string"),
    "isolate_regions a string": (_set(["isolate_regions"], "yes"), "isolate_regions must be true or false, got 'yes'"),
    "isolate_regions a number": (_set(["isolate_regions"], 1), "isolate_regions must be true or false, got 1"),
    "width zero": (_set(["width"], 0), "width must be from 8"),
    "width negative": (_set(["width"], -64), "width must be from 8"),
    "width a string": (_set(["width"], "64"), "width must be a whole number, got '64'"),
    "width a float": (_set(["width"], 64.0), "width must be a whole number"),
    "width a bool": (_set(["width"], True), "width must be a whole number, got True"),
    "width huge": (_set(["width"], 10**30), "width must be from 8"),
    "height not multiple of 8": (_set(["height"], 50), "height must be a multiple of 8"),
    "steps zero": (_set(["steps"], 0), "steps must be at least 1, got 0"),
    "steps a float": (_set(["steps"], 2.5), "steps must be a whole number"),
    "guidance nan": (_set(["guidance"], math.nan), "guidance must be a finite number"),
    "guidance inf": (_set(["guidance"], math.inf), "guidance must be a finite number"),
    "guidance negative": (_set(["guidance"], -1.0), "guidance must be a finite number >= 0, got -1.0"),
    "guidance a bool": (_set(["guidance"], False), "guidance must be a number, got False"),
    "guidance huge int": (_set(["guidance"], 10**400), "guidance must be a finite number"),
    "seed a string": (_set(["seed"], "14"), "seed must be a whole number"),
    "seed a float": (_set(["seed"], 1.5), "seed must be a whole number"),
    "seed a bool": (_set(["seed"], True), "seed must be a whole number"),
    "seed negative": (_set(["seed"], -1), "seed must be from 0"),
    "scheduler unknown": (_set(["scheduler"], "heun"), "scheduler 'heun' is unknown; choose one of ddim"),
    "regions not a list": (_set(["regions"], {"prompt": "x"}), "regions must be a list"),
    "region not a mapping": (_set(["regions", 1], "a girl"), "regions[1] must be a mapping"),
    "region prompt missing": (_drop(["regions", 0, "prompt"]), "regions[0].prompt is missing"),
    "region prompt empty": (_set(["regions", 0, "prompt"], "  "), "regions[0].prompt must not be empty"),
    "region negative not a string": (_set(["regions", 0, "negative_prompt"], 3), "regions[0].negative_prompt"),
    "box three numbers": (_set(["regions", 0, "box"], [0, 0, 1]), "regions[0].box must be 4 numbers"),
    "box five numbers": (_set(["regions", 0, "box"], [0, 0, 1, 1, 1]), "regions[0].box must be 4 numbers"),
    "box a string": (_set(["regions", 0, "box"], "0, 0, 1, 1"), "regions[0].box must be 4 numbers"),
    "box with a string": (_set(["regions", 0, "box"], [0, 0, "1", 1]), "regions[0].box must be 4 numbers"),
    "box with a bool": (_set(["regions", 0, "box"], [0, 0, True, 1]), "regions[0].box must be 4 numbers"),
    "box with nan": (_set(["regions", 0, "box"], [0, 0, math.nan, 1]), "regions[0].box must hold finite numbers"),
    "box with inf": (_set(["regions", 0, "box"], [0, 0, math.inf, 1]), "regions[0].box must hold finite numbers"),
    "box with a huge int": (_set(["regions", 0, "box"], [0, 0, 10**400, 1]), "regions[0].box must hold finite"),
    "box past the right": (_set(["regions", 0, "box"], [8, 8, 72, 24]), "regions[0].box [8, 8, 72, 24] lies outside"),
    "box past the bottom": (_set(["regions", 0, "box"], [8, 8, 40, 49]), "regions[0].box [8, 8, 40, 49] lies outside"),
    "box negative": (_set(["regions", 0, "box"], [-0.1, 0, 0.5, 1]), "lies outside the image (as fractions"),
    "box inverted x": (_set(["regions", 0, "box"], [0.5, 0, 0.2, 1]), "regions[0].box is inverted"),
    "box inverted y": (_set(["regions", 0, "box"], [8, 40, 40, 8]), "regions[0].box is inverted"),
    "box flat": (_set(["regions", 0, "box"], [8, 8, 8, 24]), "regions[0].box is inverted"),
    "box rounds to nothing": (_set(["regions", 0, "box"], [0.5, 0, 0.505, 1]), "covers no pixel once rounded"),
    "box and mask": (_set(["regions", 0, "mask"], "masks/girl.png"), "regions[0] needs exactly one of 'box'"),
    "neither box nor mask": (_drop(["regions", 1, "mask"]), "regions[1] needs exactly one of 'box'"),
    "mask missing": (_set(["regions", 1, "mask"], "masks/nobody.png"), "regions[1].mask: file"),
    "mask not a path": (_set(["regions", 1, "mask"], 7), "regions[1].mask must be a file path, got 7"),
    "mask a folder": (_set(["regions", 1, "mask"], "masks"), "regions[1].mask: file"),
    "mask corrupt": (_set(["regions", 1, "mask"], "corrupt.png"), "regions[1].mask: "),
    "mask wrong size": (_set(["regions", 1, "mask"], "wide.png"), "is 72 x 48 pixels but the layout is 64 x 48"),
    "mask empty": (_set(["regions", 1, "mask"], "empty.png"), "regions[1].mask: mask"),
    "adapter weight negative": (_set(["regions", 1, "adapter_weight"], -0.5), "regions[1].adapter_weight"),
    "adapter weight nan": (_set(["regions", 1, "adapter_weight"], math.nan), "regions[1].adapter_weight"),
    "adapter weight a string": (_set(["regions", 1, "adapter_weight"], "high"), "regions[1].adapter_weight"),
    "detail prompt empty": (_set(["regions", 0, "detail_prompt"], " "), "regions[0].detail_prompt must not be empty"),
    "detail prompt a number": (_set(["regions", 0, "detail_prompt"], 3), "regions[0].detail_prompt must be a string"),
    "detail window alone": (_set(["regions", 0, "detail_window"], [8, 0, 40, 32]),
                            "regions[0].detail_window needs a detail_prompt"),
    "detail window not square": (lambda d: _set(["regions", 0, "detail_window"], [8, 0, 40, 24])(
        _set(["regions", 0, "detail_prompt"], "a face")(d)), "is 32 x 24 pixels: make it square"),
    "detail window elsewhere": (lambda d: _set(["regions", 0, "detail_window"], [44, 24, 64, 44])(
        _set(["regions", 0, "detail_prompt"], "a face")(d)), "does not overlap the region ([8, 8, 40, 24])"),
    "detail window outside": (lambda d: _set(["regions", 0, "detail_window"], [40, 0, 72, 32])(
        _set(["regions", 0, "detail_prompt"], "a face")(d)), "regions[0].detail_window [40, 0, 72, 32] lies outside"),
    "detail strength zero": (_set(["detail_strength"], 0), "detail_strength must be in (0, 1]"),
    "detail strength above one": (_set(["detail_strength"], 1.5), "detail_strength must be in (0, 1]"),
    "detail strength a string": (_set(["detail_strength"], "high"), "detail_strength must be a number"),
    "conditions not a list": (_set(["conditions"], "pose.png"), "conditions must be a list"),
    "condition type unknown": (_set(["conditions", 0, "type"], "pose"), "conditions[0].type 'pose' is not a known"),
    "condition model missing": (_drop(["conditions", 0, "model"]), "conditions[0].model is missing"),
    "condition model empty": (_set(["conditions", 0, "model"], ""), "conditions[0].model must not be empty"),
    "condition image missing": (_set(["conditions", 0, "image"], "nopose.png"), "conditions[0].image: file"),
    "condition image corrupt": (_set(["conditions", 0, "image"], "corrupt.png"), "not a readable image"),
    "condition image wrong size": (_set(["conditions", 0, "image"], "wide.png"), "conditions[0].image: "),
    "condition weight inf": (_set(["conditions", 0, "weight"], math.inf), "conditions[0].weight must be a finite"),
    "condition weight negative": (_set(["conditions", 0, "weight"], -1), "conditions[0].weight must be a finite"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_field(folder, case):
    change, expected = BAD[case]
    with pytest.raises(MixOfShowError) as caught:
        load_layout(change(copy.deepcopy(valid_document())), base_dir=folder)
    assert expected in str(caught.value), str(caught.value)
    assert str(caught.value).startswith("layout: ")


def test_errors_list_what_is_allowed(folder):
    with pytest.raises(MixOfShowError, match="allowed fields: " + ", ".join(LAYOUT_KEYS)):
        load_layout(_set(["colour"], "red")(valid_document()), base_dir=folder)
    with pytest.raises(MixOfShowError, match="known types: " + ", ".join(CONDITION_TYPES)):
        load_layout(_set(["conditions", 0, "type"], "pose")(valid_document()), base_dir=folder)
    with pytest.raises(MixOfShowError, match=r"regions\[0\].box .* lies outside the image \(as pixels of a 64 x 48"):
        load_layout(_set(["regions", 0, "box"], [8, 8, 72, 24])(valid_document()), base_dir=folder)


def test_bad_files(tmp_path):
    with pytest.raises(MixOfShowError, match="not found"):
        load_layout(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("prompt: [unclosed\nwidth: 64\n")
    with pytest.raises(MixOfShowError, match="could not be parsed"):
        load_layout(broken)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(MixOfShowError):
        load_layout(binary)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(MixOfShowError, match="mapping"):
        load_layout(listing)
    with pytest.raises(MixOfShowError, match="must be a mapping of fields"):
        load_layout(42)


def test_error_names_the_file(folder):
    path = folder / "layout.yaml"
    path.write_text(_yaml(_set(["regions", 0, "box"], [0, 0, 1])(valid_document())))
    with pytest.raises(MixOfShowError, match=rf"^{path}: regions\[0\].box must be 4 numbers"):
        load_layout(path)


# ---------------------------------------------------------------------------------------------------------------
# The official format


def test_official_conversion():
    layout = layout_from_official(OFFICIAL, 512, 512, prompt="two girls near a lake", negative_prompt="worst")
    assert layout.prompt == "two girls near a lake" and layout.negative_prompt == "worst"
    hina, kaori = layout.regions
    assert hina == Region("a <hina1> <hina2>, standing near a lake", "longbody, lowres, bad anatomy", (0, 0, 256, 512))
    assert kaori == Region("a <kaori1> <kaori2>, girl", "lowres", (256, 0, 512, 512))


def test_official_y_first_on_a_wide_image():
    layout = layout_from_official("[left]-*-[]-*-[10, 20, 300, 200]", 768, 512)
    assert layout.regions[0].box == (20, 10, 200, 300), "[y0, x0, y1, x1] becomes [x0, y0, x1, y1]"
    assert layout.regions[0].negative_prompt == ""


def test_official_pixels_even_when_small():
    assert layout_from_official("[p]-*-[n]-*-[0, 0, 1, 1]", 64, 64).regions[0].box == (0, 0, 1, 1)


def test_official_without_brackets_and_trailing_bar():
    layout = layout_from_official(" a <hina1> -*- lowres -*- 0, 0, 64, 32 |[b]-*-[n]-*-[]|", 64, 64)
    assert layout.regions[0] == Region("a <hina1>", "lowres", (0, 0, 32, 64))
    assert layout.regions[1].box == (0, 0, 64, 64), "an empty box covers the whole image"


@pytest.mark.parametrize("rewrite, expected", [
    ("[a]-*-[0, 0, 512, 256]", "has 2 part(s)"),
    ("[a]-*-[b]-*-[c]-*-[0, 0, 512, 256]", "has 4 part(s)"),
    ("[a]-*-[b]-*-[0, 0, 512]", "regions[0].box must be 4 numbers"),
    ("[a]-*-[b]-*-[0, 0, 512, x]", "regions[0].box must be 4 numbers"),
    ("[a]-*-[b]-*-[0, 0, 512, nan]", "regions[0].box must be 4 numbers"),
    ("[a]-*-[b]-*-[0, 0, 512, 1e999]", "regions[0].box must hold finite numbers"),
    ("[a]-*-[b]-*-[0, 0, 512, 256]|[c]-*-[d]-*-[0, 0, 600, 256]", "regions[1].box [0, 0, 256, 600] lies outside"),
    ("[a]-*-[b]-*-[0, 256, 512, 0]", "regions[0].box is inverted"),
    ("[]-*-[b]-*-[0, 0, 512, 256]", "regions[0].prompt must not be empty"),
    ("", "no region given"),
    ("[a]-*-[b]-*-[0, 0, 512, 256]||[c]-*-[d]-*-[0, 0, 1, 1]", "regions[1]"),
    ("[a]-*-[b]-*-__import__('os').system('echo pwned')", "regions[0].box must be 4 numbers"),
    ("[a]-*-[b]-*-[__import__('os'), 0, 1, 1]", "regions[0].box must be 4 numbers"),
])
def test_official_malformed(rewrite, expected):
    with pytest.raises(MixOfShowError) as caught:
        layout_from_official(rewrite, 512, 512)
    assert expected in str(caught.value), str(caught.value)
    assert str(caught.value).startswith("official prompt_rewrite: ")


def test_official_error_shows_what_was_written():
    with pytest.raises(MixOfShowError, match=r"converted from the official \[y0, x0, y1, x1\] = \[0, 0, 600, 256\]"):
        layout_from_official("[a]-*-[b]-*-[0, 0, 600, 256]", 512, 512)


def test_official_bad_size_and_type():
    with pytest.raises(MixOfShowError, match="width must be a multiple of 8"):
        layout_from_official(OFFICIAL, 510, 512)
    with pytest.raises(MixOfShowError, match="must be a string"):
        layout_from_official(None, 512, 512)


# ---------------------------------------------------------------------------------------------------------------
# Preview


def test_preview_on_grey(folder):
    document = valid_document()
    del document["conditions"]
    layout = load_layout(document, base_dir=folder)
    image = draw_layout_preview(layout)
    assert image.size == (WIDTH, HEIGHT) and image.mode == "RGB"
    pixels = np.asarray(image)  # (H, W, 3)
    assert tuple(pixels[16, 8]) == PALETTE[0], "the box's left edge in the first region's colour"
    assert tuple(pixels[8, 39]) == PALETTE[0], "and its top-right corner pixel"
    assert tuple(pixels[2, 62]) == GREY, "outside every region the canvas stays grey"
    inside_mask = pixels[20:28, 40:56].reshape(-1, 3)
    assert all(tuple(p) != GREY for p in inside_mask), "the mask region is tinted or outlined"


def test_preview_on_the_condition_image(folder):
    layout = load_layout(valid_document(), base_dir=folder)
    pixels = np.asarray(draw_layout_preview(layout))
    assert tuple(pixels[2, 62]) == (0, 0, 0), "the (black) pose image is the background"
    background = Image.new("RGB", (WIDTH * 2, HEIGHT * 2), (0, 0, 255))
    pixels = np.asarray(draw_layout_preview(layout, background=background))
    assert pixels.shape == (HEIGHT, WIDTH, 3) and tuple(pixels[2, 62]) == (0, 0, 255)


def test_preview_long_prompts(folder):
    document = {"prompt": "x " * 500, "width": 512, "height": 256,
                "regions": [{"prompt": "a very long region prompt " * 40, "box": [0, 0, 0.1, 0.1]}]}
    assert draw_layout_preview(load_layout(document)).size == (512, 256)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_convert_and_preview(tmp_path, capsys):
    out = tmp_path / "layouts" / "two.yaml"
    code = main(["layout", "convert", "--official", OFFICIAL, "--width", "512", "--height", "512",
                 "--prompt", "two girls", "--negative-prompt", "worst", "--out", str(out)])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    assert load_layout(out) == layout_from_official(OFFICIAL, 512, 512, prompt="two girls", negative_prompt="worst")

    preview = tmp_path / "previews" / "two.png"
    assert main(["layout", "preview", str(out), "--out", str(preview)]) == 0
    assert Image.open(preview).size == (512, 512)


def test_cli_bad_input(folder, tmp_path, capsys):
    code = main(["layout", "convert", "--official", "[a]-*-[0, 0, 1, 1]", "--width", "512", "--height", "512",
                 "--out", str(tmp_path / "x.yaml")])
    assert code == 2 and not (tmp_path / "x.yaml").exists()
    assert "error: official prompt_rewrite: regions[0]" in capsys.readouterr().err

    bad = folder / "bad.yaml"
    bad.write_text(_yaml(_set(["regions", 1, "mask"], "empty.png")(valid_document())))
    assert main(["layout", "preview", str(bad), "--out", str(tmp_path / "p.png")]) == 2
    assert "regions[1].mask" in capsys.readouterr().err

    good = folder / "good.yaml"
    good.write_text(_yaml(valid_document()))
    assert main(["layout", "preview", str(good), "--out", str(tmp_path / "p.notanimage")]) == 2
    assert "--out must name an image file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Fuzzing: whatever the document, only MixOfShowError (or a layout) comes out.

LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
          | st.sampled_from(["masks/girl.png", "pose.png", "corrupt.png", "wide.png", "empty.png", "keypose",
                             "ddim", "", "~nobody/x", "a\x00b", "x" * 300, 8, 64, 0.5, 1.0, 10**400]))
KEYS = st.sampled_from(sorted(set(LAYOUT_KEYS + REGION_KEYS + ("type", "model", "image", "weight")))) | st.text(
    max_size=8)
DOCUMENTS = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
                         max_leaves=25)


def _paths(node, prefix=()):
    """Every (container path, key) in a document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


def _outcome(call):
    try:
        result = call()
    except MixOfShowError as error:
        assert str(error)
        return None
    assert isinstance(result, Layout)
    return result


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENTS)
def test_fuzz_random_documents(shared_folder, document):
    _outcome(lambda: load_layout(document, base_dir=shared_folder))
    if isinstance(document, dict):
        _outcome(lambda: load_layout({"prompt": "p", **document}, base_dir=shared_folder))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_layouts(shared_folder, data):
    document = valid_document()
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(document))
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        change = data.draw(st.sampled_from(["drop", "replace"]))
        if change == "drop":
            document = _drop(list(path))(document)
        else:
            document = _set(list(path), data.draw(DOCUMENTS))(document)
    layout = _outcome(lambda: load_layout(document, base_dir=shared_folder))
    if layout is not None:
        assert layout.region_masks().shape == (len(layout.regions), layout.height, layout.width)
        assert load_layout(layout.to_dict()) == layout


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet="prompt:width 64[]{}-,\n\"'#&*!|>%@`\t0123456789.", max_size=60))
def test_fuzz_layout_files(shared_folder, text):
    path = shared_folder / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _outcome(lambda: load_layout(path))


@settings(max_examples=30, deadline=None)
@given(rewrite=st.text(alphabet="[]|-*, 0123456789.e+<>ab_()'", max_size=60))
def test_fuzz_official_strings(rewrite):
    _outcome(lambda: layout_from_official(rewrite, 64, 64))


def _yaml(document: dict) -> str:
    import yaml

    return yaml.safe_dump(document, sort_keys=False)
