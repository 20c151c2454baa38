"""Tests for mixofshow.data: concept folder scanning/validation and deterministic ConceptDataset sampling."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mixofshow.data import (
    CONCEPT_PLACEHOLDER,
    IMAGE_SUFFIXES,
    ConceptDataset,
    ConceptExample,
    scan_concept_folder,
)
from mixofshow.errors import MixOfShowError


def _save_image(path: Path, size=(48, 32), color=(255, 0, 0)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _gradient_image(path: Path, size=(64, 32)) -> Path:
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    Image.fromarray(arr).save(path)
    return path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- scan_concept_folder: happy path -------------------------------------------------------------------------------


def test_scan_reads_captions_defaults_and_ignores_other_files(tmp_path):
    _save_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  a photo of <TOK>, smiling \n")
    _save_image(tmp_path / "a.JPG")  # no caption file -> default
    _save_image(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("   \n")  # empty caption counts as missing
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _save_image(tmp_path / "sub" / "nested.png")
    _save_image(tmp_path / ".hidden.png")

    examples = scan_concept_folder(tmp_path, default_caption="<TOK> default")

    assert [e.image_path.name for e in examples] == ["a.JPG", "b.png", "c.webp"]
    assert [e.caption for e in examples] == ["<TOK> default", "a photo of <TOK>, smiling", "<TOK> default"]
    assert all(e.mask_path is None for e in examples)
    assert all(isinstance(e, ConceptExample) for e in examples)


def test_scan_accepts_string_paths_and_all_suffixes(tmp_path):
    for i, suffix in enumerate(IMAGE_SUFFIXES):
        _save_image(tmp_path / f"img{i}{suffix.upper() if i % 2 else suffix}")
    examples = scan_concept_folder(str(tmp_path))
    assert len(examples) == len(IMAGE_SUFFIXES)
    assert all(e.caption == f"a photo of {CONCEPT_PLACEHOLDER}" for e in examples)


def test_scan_without_placeholder_requirement(tmp_path):
    _save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a plain caption")
    examples = scan_concept_folder(tmp_path, require_placeholder=False)
    assert examples[0].caption == "a plain caption"


def test_scan_finds_masks(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    _save_image(data / "x.jpg")
    Image.new("L", (48, 32), 255).save(masks / "x.png")
    (ex,) = scan_concept_folder(data, masks)
    assert ex.mask_path == masks / "x.png"


# ---- scan_concept_folder: errors -----------------------------------------------------------------------------------


def test_error_data_dir_missing(tmp_path):
    with pytest.raises(MixOfShowError, match="does not exist") as err:
        scan_concept_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_error_data_dir_is_file(tmp_path):
    f = tmp_path / "file.png"
    _save_image(f)
    with pytest.raises(MixOfShowError, match="not a directory"):
        scan_concept_folder(f)


def test_error_no_images_lists_suffixes(tmp_path):
    (tmp_path / "a.txt").write_text("<TOK>")
    (tmp_path / "b.gif").write_bytes(b"GIF89a")
    with pytest.raises(MixOfShowError, match="no images found") as err:
        scan_concept_folder(tmp_path)
    for suffix in IMAGE_SUFFIXES:
        assert suffix in str(err.value)


def test_error_undecodable_image(tmp_path):
    _save_image(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(MixOfShowError, match="cannot be decoded") as err:
        scan_concept_folder(tmp_path)
    assert str(tmp_path / "bad.png") in str(err.value)
    assert "good.png" not in str(err.value)


def test_error_truncated_image(tmp_path):
    buf = io.BytesIO()
    _gradient_image(tmp_path / "full.png")
    Image.open(tmp_path / "full.png").save(buf, format="PNG")
    (tmp_path / "full.png").unlink()
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(MixOfShowError, match="cut.png"):
        scan_concept_folder(tmp_path)


def test_error_mask_dir_missing(tmp_path):
    _save_image(tmp_path / "a.png")
    with pytest.raises(MixOfShowError, match="mask folder does not exist") as err:
        scan_concept_folder(tmp_path, tmp_path / "masks")
    assert str(tmp_path / "masks") in str(err.value)


def test_error_missing_mask_names_image_and_expected_path(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    _save_image(data / "a.png")
    _save_image(data / "b.jpeg")
    Image.new("L", (48, 32), 255).save(masks / "a.png")
    with pytest.raises(MixOfShowError, match="has no mask") as err:
        scan_concept_folder(data, masks)
    assert str(data / "b.jpeg") in str(err.value)
    assert str(masks / "b.png") in str(err.value)


def test_error_undecodable_mask(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    _save_image(data / "a.png")
    (masks / "a.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    with pytest.raises(MixOfShowError, match="mask cannot be decoded") as err:
        scan_concept_folder(data, masks)
    assert str(masks / "a.png") in str(err.value)


def test_error_mask_size_mismatch_names_both_sizes(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    _save_image(data / "a.png", size=(48, 32))
    Image.new("L", (40, 30), 255).save(masks / "a.png")
    with pytest.raises(MixOfShowError) as err:
        scan_concept_folder(data, masks)
    msg = str(err.value)
    assert str(masks / "a.png") in msg and "40x30" in msg and "48x32" in msg


def test_error_caption_without_placeholder(tmp_path):
    _save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of a dog\n")
    with pytest.raises(MixOfShowError, match=CONCEPT_PLACEHOLDER) as err:
        scan_concept_folder(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "a.txt") in msg
    assert "'a photo of a dog'" in msg


def test_error_default_caption_without_placeholder(tmp_path):
    _save_image(tmp_path / "a.png")
    with pytest.raises(MixOfShowError, match="default_caption"):
        scan_concept_folder(tmp_path, default_caption="a photo")


def test_errors_are_reported_together(tmp_path):
    (tmp_path / "bad1.png").write_bytes(b"x")
    (tmp_path / "bad2.jpg").write_bytes(b"y")
    with pytest.raises(MixOfShowError, match="2 invalid") as err:
        scan_concept_folder(tmp_path)
    assert "bad1.png" in str(err.value) and "bad2.jpg" in str(err.value)


# ---- ConceptDataset -----------------------------------------------------------------------------------------------


def _half_red_with_mask(tmp_path, size=(64, 32)):
    """Left half red / right half blue, mask white on the left half."""
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    w, h = size
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, : w // 2, 0] = 255
    img[:, w // 2 :, 2] = 255
    Image.fromarray(img).save(data / "a.png")
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, : w // 2] = 200  # above the threshold
    mask[0, -1] = 100  # below the threshold -> 0
    Image.fromarray(mask, mode="L").save(masks / "a.png")
    return scan_concept_folder(data, masks)


def test_mask_aligned_with_image_under_crop_and_flip(tmp_path):
    ds = ConceptDataset(_half_red_with_mask(tmp_path), resolution=32, concept_text="<c1> <c2>", flip_p=0.5)
    flips = set()
    for seed in range(20):
        s = ds.sample(0, _gen(seed))
        red = s["pixel_values"][0] > 0
        assert torch.equal(red, s["mask"][0].bool())
        assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
        flips.add(bool(red[0, -1]) and not bool(red[0, 0]))
    assert flips == {True, False}  # both flipped and unflipped crops were seen


def test_mask_alignment_after_resize(tmp_path):
    ds = ConceptDataset(_half_red_with_mask(tmp_path, size=(128, 64)), resolution=32, concept_text="c", flip_p=1.0)
    s = ds.sample(0, _gen(0))
    assert s["mask"].shape == (1, 32, 32)
    # away from the blurred boundary column, red pixels are exactly the mask pixels
    red = s["pixel_values"][0] > 0
    interior = (s["pixel_values"][0] > 0.9) | (s["pixel_values"][2] > 0.9)
    assert interior.sum() > 32 * 28
    assert torch.equal(red[interior], s["mask"][0].bool()[interior])


def test_no_mask_means_all_ones_and_value_ranges(tmp_path):
    _gradient_image(tmp_path / "g.png", size=(50, 70))
    ds = ConceptDataset(scan_concept_folder(tmp_path), resolution=24, concept_text="<v>")
    s = ds.sample(0, _gen(1))
    pv, mask = s["pixel_values"], s["mask"]
    assert pv.shape == (3, 24, 24) and pv.dtype == torch.float32
    assert mask.shape == (1, 24, 24) and mask.dtype == torch.float32
    assert pv.min() >= -1.0 and pv.max() <= 1.0
    assert pv.min() < -0.5 and pv.max() > 0.5  # the gradient spans the range
    assert torch.all(mask == 1.0)
    assert s["caption"] == "a photo of <v>"
    assert len(ds) == 1


def test_determinism(tmp_path):
    _gradient_image(tmp_path / "g.png", size=(64, 32))
    ds = ConceptDataset(scan_concept_folder(tmp_path), resolution=32, concept_text="<v>")
    a, b = ds.sample(0, _gen(7)), ds.sample(0, _gen(7))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["mask"], b["mask"])
    assert a["caption"] == b["caption"]
    outs = {ds.sample(0, _gen(seed))["pixel_values"].numpy().tobytes() for seed in range(10)}
    assert len(outs) > 1


def test_caption_placeholder_replaced_everywhere(tmp_path):
    _save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("<TOK> and <TOK> again")
    ds = ConceptDataset(scan_concept_folder(tmp_path), resolution=16, concept_text="<hina1> <hina2>")
    assert ds.sample(0, _gen(0))["caption"] == "<hina1> <hina2> and <hina1> <hina2> again"


def test_shuffle_caption_keeps_first_part(tmp_path):
    _save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of <TOK>, red hat, blue coat, smiling, outdoors, sunny")
    ds = ConceptDataset(scan_concept_folder(tmp_path), resolution=16, concept_text="<c>", shuffle_caption=True)
    captions = {ds.sample(0, _gen(seed))["caption"] for seed in range(20)}
    assert len(captions) > 1
    for c in captions:
        parts = c.split(", ")
        assert parts[0] == "a photo of <c>"
        assert sorted(parts[1:]) == sorted(["red hat", "blue coat", "smiling", "outdoors", "sunny"])


def test_shuffle_caption_keep_tokens_two(tmp_path):
    _save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("<TOK>, one, two, three, four")
    ds = ConceptDataset(
        scan_concept_folder(tmp_path), resolution=16, concept_text="<c>", shuffle_caption=True, keep_tokens=2
    )
    for seed in range(10):
        assert ds.sample(0, _gen(seed))["caption"].startswith("<c>, one, ")


def test_caption_templates(tmp_path):
    _save_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("<TOK> original")
    templates = ("a photo of {}", "a render of {}")
    ds = ConceptDataset(scan_concept_folder(tmp_path), resolution=16, concept_text="<c>", caption_templates=templates)
    captions = [ds.sample(0, _gen(seed))["caption"] for seed in range(60)]
    assert set(captions) == {"<c> original", "a photo of <c>", "a render of <c>"}
    assert 10 < captions.count("<c> original") < 50


def test_batch_stacks(tmp_path):
    _gradient_image(tmp_path / "a.png", size=(40, 30))
    _save_image(tmp_path / "b.png", size=(30, 40))
    ds = ConceptDataset(scan_concept_folder(tmp_path), resolution=20, concept_text="<c>")
    out = ds.batch([0, 1, 1], _gen(3))
    assert out["pixel_values"].shape == (3, 3, 20, 20)
    assert out["mask"].shape == (3, 1, 20, 20)
    assert out["captions"] == ["a photo of <c>"] * 3
    again = ds.batch([0, 1, 1], _gen(3))
    assert torch.equal(out["pixel_values"], again["pixel_values"])


@pytest.mark.parametrize("with_mask", [True, False])
def test_zoom_out_shrinks_the_crop_onto_a_canvas_outside_the_mask(tmp_path, with_mask):
    examples = _half_red_with_mask(tmp_path, size=(32, 32))
    if not with_mask:
        examples = [ConceptExample(e.image_path, e.caption, None) for e in examples]
    ds = ConceptDataset(examples, resolution=32, concept_text="c", flip_p=0.0, zoom_out_p=1.0, zoom_out_min=0.5)
    sides = set()
    for seed in range(12):
        s = ds.sample(0, _gen(seed))
        image = s["pixel_values"] > -1  # (3, R, R): the shrunk crop is wherever a channel is not -1
        ys, xs = np.nonzero(image.any(dim=0).numpy())
        side = ys.max() - ys.min() + 1
        assert side == xs.max() - xs.min() + 1 and 16 <= side <= 32  # a square of at least zoom_out_min
        sides.add(int(side))
        red = s["pixel_values"][0] > 0
        assert not s["mask"][0][~image.any(dim=0)].any()  # the canvas is never in the loss
        if with_mask:
            assert (red == s["mask"][0].bool()).float().mean() > 0.95  # the subject mask shrank with the image
        else:
            assert s["mask"][0].bool().equal(image.any(dim=0))  # without a mask file: the loss covers the image
    assert len(sides) > 3 and min(sides) < 28


def test_dataset_argument_errors(tmp_path):
    _save_image(tmp_path / "a.png")
    examples = scan_concept_folder(tmp_path)
    with pytest.raises(MixOfShowError, match="resolution"):
        ConceptDataset(examples, resolution=0, concept_text="<c>")
    with pytest.raises(MixOfShowError, match="flip_p"):
        ConceptDataset(examples, resolution=16, concept_text="<c>", flip_p=1.5)
    with pytest.raises(MixOfShowError, match="zoom_out_p"):
        ConceptDataset(examples, resolution=16, concept_text="<c>", zoom_out_p=-0.1)
    with pytest.raises(MixOfShowError, match="zoom_out_min"):
        ConceptDataset(examples, resolution=16, concept_text="<c>", zoom_out_min=1.5)
    with pytest.raises(MixOfShowError, match="template"):
        ConceptDataset(examples, resolution=16, concept_text="<c>", caption_templates=("no slot",))
    with pytest.raises(MixOfShowError, match="no examples"):
        ConceptDataset([], resolution=16, concept_text="<c>")
    ds = ConceptDataset(examples, resolution=16, concept_text="<c>")
    with pytest.raises(IndexError):
        ds.sample(1, _gen(0))
    with pytest.raises(MixOfShowError, match="no indices"):
        ds.batch([], _gen(0))


# ---- fuzzing: garbage image bytes --------------------------------------------------------------------------------


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(6, 8, 3)).save(buf, format="PNG")
    return buf.getvalue()


_VALID_PNG = _png_bytes()


@st.composite
def _corrupted_png(draw) -> bytes:
    data = bytearray(_VALID_PNG)
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.one_of(st.binary(max_size=256), _corrupted_png()))
def test_garbage_png_loads_or_raises_mixofshow_error(payload):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "x.png").write_bytes(payload)
        try:
            examples = scan_concept_folder(tmp)
            ConceptDataset(examples, resolution=8, concept_text="<c>").sample(0, _gen(0))
        except MixOfShowError as err:
            assert "x.png" in str(err)
