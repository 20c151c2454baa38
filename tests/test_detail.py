"""The region detail pass: windows, what it redraws and leaves, its seed, bad input; the toy world's details."""

import numpy as np
import pytest
from PIL import Image

from mixofshow.concept_file import save_concept
from mixofshow.demo import region_details
from mixofshow.errors import MixOfShowError
from mixofshow.layout import load_layout
from mixofshow.pipelines import MixOfShowPipeline
from mixofshow.pipelines.detail import RegionDetail, detail_regions, detail_windows, square_window
from mixofshow.testing import random_concept, tiny_components
from mixofshow.toyworld.concepts import get_concept
from mixofshow.toyworld.evaluate import composition_target
from mixofshow.toyworld.render import object_geometry

SIZE = 32  # the tiny model's image size


@pytest.fixture(scope="module")
def pipe():
    return MixOfShowPipeline(**tiny_components(0))


def noise_images(count=2, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def run(pipe, images, details, **kwargs):
    kwargs = {"strength": 0.6, "num_inference_steps": 4, "seed": 1, "progress": False, **kwargs}
    return [np.asarray(image) for image in detail_regions(pipe, images, details, **kwargs)]


@pytest.mark.parametrize("box", [(0.6, 0.2, 1.0, 0.8), (0.0, 0.0, 0.1, 0.3), (0.3, 0.0, 0.5, 1.0)])
def test_the_default_window_is_the_smallest_square_holding_the_box_inside_the_image(box):
    left, top, side = square_window(box, 64, 48)
    x0, y0, x1, y1 = box[0] * 64, box[1] * 48, box[2] * 64, box[3] * 48
    assert 0 <= left and 0 <= top and left + side <= 64 and top + side <= 48
    assert side == min(max(np.ceil(x1 - x0), np.ceil(y1 - y0)), 48)
    assert left <= x0 + 0.5 and x1 - 0.5 <= left + side  # holds the box (up to rounding) wherever it fits
    if side < 48:
        assert top <= y0 + 0.5 and y1 - 0.5 <= top + side


def test_only_the_box_inside_its_window_is_redrawn(pipe):
    images = noise_images()
    box, window = (0.25, 0.0, 0.75, 1.0), (0.25, 0.25, 0.75, 0.75)  # a full-height band, a square in its middle
    out = run(pipe, images, [RegionDetail(box, "a red cat", window=window)])
    before = [np.asarray(image) for image in images]
    redrawn = (slice(8, 24), slice(8, 24))
    for old, new in zip(before, out):
        kept = np.ones((SIZE, SIZE), bool)
        kept[redrawn] = False
        assert np.array_equal(old[kept], new[kept])  # every pixel outside box and window, exactly
        assert np.abs(old[redrawn].astype(int) - new[redrawn]).mean() > 10


def test_a_seed_gives_the_same_pixels_and_another_seed_others(pipe):
    images = noise_images(1)
    details = [RegionDetail((0.0, 0.0, 0.5, 0.5), "a red cat"), RegionDetail((0.5, 0.5, 1.0, 1.0), "a blue dog")]
    first, again, other = (run(pipe, images, details, seed=seed)[0] for seed in (3, 3, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_concept_words_reach_the_detail_prompt(tmp_path):
    pipe = MixOfShowPipeline(**tiny_components(0))
    concept = random_concept(tiny_components(0), ("<cat1>", "<cat2>"), seed=2)
    save_concept(concept, tmp_path / "cat.safetensors")
    pipe.load_concept(tmp_path / "cat.safetensors", scale=2.0)
    images = noise_images(1)
    box = (0.0, 0.0, 1.0, 1.0)
    with_concept = run(pipe, images, [RegionDetail(box, "a <cat1> <cat2> on a sofa")])[0]
    plain = run(pipe, images, [RegionDetail(box, "a cat on a sofa")])[0]
    assert np.abs(with_concept.astype(int) - plain).mean() > 1


@pytest.mark.parametrize("detail, strength, message", [
    (RegionDetail((0.5, 0.5, 0.4, 1.0), "a cat"), 0.5, "details[0].box"),
    (RegionDetail((0.0, 0.0, 0.5, 0.5), "a cat", window=(0.0, 0.0, 0.5, 1.0)), 0.5, "make it square"),
    (RegionDetail((0.6, 0.6, 1.0, 1.0), "a cat", window=(0.0, 0.0, 0.5, 0.5)), 0.5, "does not overlap"),
    (RegionDetail((0.0, 0.0, 0.5, 0.5), "a <dog1> on grass"), 0.5, "details[0].prompt"),
    (RegionDetail((0.0, 0.0, 0.5, 0.5), "a cat"), 0.0, "strength must be in (0, 1]"),
])
def test_bad_details_are_refused_before_any_work(pipe, detail, strength, message):
    with pytest.raises(MixOfShowError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        detail_regions(pipe, noise_images(1), [detail], strength=strength, progress=False)


def test_images_of_different_sizes_are_refused(pipe):
    with pytest.raises(MixOfShowError, match="same size"):
        detail_regions(pipe, noise_images(1) + noise_images(1, size=16), [RegionDetail((0, 0, 1, 1), "a cat")])


def test_toy_details_show_each_small_object_medium_sized_and_say_where_it_sits():
    target = composition_target([get_concept(name) for name in ("pip", "rex", "nova")])
    details = region_details(target)
    assert [d.box for d in details] == list(target.regions)
    places = ("on the left", "in the center", "on the right")
    for detail, (left, top, side), obj, place in zip(details, detail_windows(details, 64, 64),
                                                     target.scene.objects, places):
        x, y, _ = object_geometry(obj)
        assert obj.size == "small" and side == round(64 * 0.11 / 0.16)  # where a small object looks medium
        assert left <= x * 64 <= left + side and top <= y * 64 <= top + side
        # medium is the caption's unnamed size; a window at the image's edge keeps its object off-centre
        assert detail.prompt.endswith(f"{place}, white background") and "small" not in detail.prompt
    assert details[0].prompt.startswith("a <pip1> <pip2>") and details[2].prompt.startswith("a <nova1> <nova2>")
    two = region_details(composition_target([get_concept(name) for name in ("pip", "nova")]))
    assert all(d.window == (0.0, 0.0, 1.0, 1.0) for d in two)  # medium objects: the whole image, no zoom
    assert [d.prompt for d in two] == [target.region_prompt(i) for target in
                                        [composition_target([get_concept("pip"), get_concept("nova")])]
                                        for i in range(2)]


def test_a_layout_region_with_a_detail_prompt_is_redrawn_after_sampling(pipe):
    document = {"prompt": "a cat and a dog", "width": SIZE, "height": SIZE, "steps": 3, "seed": 5,
                "regions": [{"prompt": "a red cat", "box": [0.0, 0.0, 0.5, 1.0]},
                            {"prompt": "a dog", "box": [0.5, 0.0, 1.0, 1.0]}]}
    plain = np.asarray(pipe.sample_layout(load_layout(document), progress=False).images[0])
    document["regions"][0].update(detail_prompt="a red cat, close-up", detail_window=[0, 8, 16, 24])
    detailed_layout = load_layout(document)
    detailed = np.asarray(pipe.sample_layout(detailed_layout, progress=False).images[0])
    changed = np.abs(detailed.astype(int) - plain).sum(-1) > 0
    assert changed[8:24, 0:16].mean() > 0.5 and not changed[:8].any() and not changed[24:].any()
    assert not changed[:, 16:].any()
    with pytest.raises(MixOfShowError, match="output_type 'pil'"):
        pipe.sample_layout(detailed_layout, output_type="np", progress=False)
    document["regions"][0]["detail_prompt"] = "a <nobody1> cat"
    with pytest.raises(MixOfShowError, match="detail_prompt"):
        pipe.sample_layout(load_layout(document), progress=False)
