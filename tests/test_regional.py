"""Regionally controllable sampling on the tiny model: region-aware cross-attention, parity with plain sampling,
locality, T2I-Adapter / ControlNet conditions with region weights, layouts, bad input."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from PIL import Image

from mixofshow.attention import REGIONS_KEY, MixOfShowAttnProcessor, RegionalAttention, cross_attention_layers
from mixofshow.concept_file import save_concept
from mixofshow.errors import MixOfShowError
from mixofshow.layout import load_layout
from mixofshow.pipelines import MixOfShowPipeline
from mixofshow.pipelines.regional import RegionPrompts, SpatialCondition, load_condition_model
from mixofshow.testing import random_concept, random_controlnet, random_t2i_adapter, tiny_components

SIZE = 32  # the tiny model's image size (latent 16x16)
PROMPT = "a photo of a girl near the sea"
NEGATIVE = "lowres"


def new_pipeline():
    return MixOfShowPipeline(**tiny_components(0))


def sample(pipe, prompt=PROMPT, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "latent", "seed": 3, "progress": False,
              "negative_prompt": NEGATIVE, **kwargs}
    return pipe(prompt, **kwargs).images


def box_mask(x0, y0, x1, y1, size=SIZE):
    mask = torch.zeros(size, size)
    mask[y0:y1, x0:x1] = 1
    return mask


@pytest.fixture(scope="module")
def pipe():
    return new_pipeline()


# -- the processor --------------------------------------------------------------------------------------------------


def first_layer_inputs(seed, batch, positions, regions):
    """The tiny UNet's first cross-attention layer with its processor, and random inputs for it: hidden states
    `(batch, positions, C)`, global prompt states `(batch, 77, D)`, region states `(regions, 1, batch, 77, D)`."""
    _, attn = cross_attention_layers(tiny_components(0)["unet"])[0]
    torch.manual_seed(seed)
    hidden = torch.randn(batch, positions, attn.to_q.in_features)
    global_states = torch.randn(batch, 77, attn.to_k.in_features)
    states = torch.randn(regions, 1, batch, 77, attn.to_k.in_features)
    return attn, MixOfShowAttnProcessor(layer_index=0), hidden, global_states, states


def test_region_tokens_reach_only_their_region():
    """Outside region 0, the layer output does not depend on region 0's prompt at all; inside, it is the attention
    to that prompt alone."""
    attn, processor, hidden, global_states, states = first_layer_inputs(0, batch=2, positions=8 * 8, regions=2)
    masks = torch.stack([box_mask(0, 0, 4, 8, 8), box_mask(4, 0, 8, 8, 8)])

    def run(region_states):
        return processor(attn, hidden, global_states, regional_attention=RegionalAttention(region_states, masks))

    changed = states.clone()
    changed[0] = torch.randn_like(changed[0])
    before, after = run(states), run(changed)
    left = masks[0].flatten().bool()
    assert torch.equal(before[:, ~left], after[:, ~left])
    assert (before[:, left] - after[:, left]).abs().mean() > 1e-2
    alone = processor(attn, hidden, states[0, 0])  # the plain layer reading region 0's prompt everywhere
    torch.testing.assert_close(before[:, left], alone[:, left], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, processor(attn, hidden, global_states))  # every pixel is in a region


def test_overlapping_regions_average_and_uncovered_pixels_keep_the_global_prompt():
    attn, processor, hidden, global_states, states = first_layer_inputs(1, batch=1, positions=4 * 4, regions=2)
    masks = torch.stack([box_mask(0, 0, 3, 4, 4), box_mask(1, 0, 4, 4, 4)])
    masks[:, 3] = 0  # the last row is in no region
    out = processor(attn, hidden, global_states, regional_attention=RegionalAttention(states, masks))
    plain = processor(attn, hidden, global_states)
    first, second = (processor(attn, hidden, states[i, 0]) for i in range(2))
    grid = lambda x: x.view(1, 4, 4, -1)
    torch.testing.assert_close(grid(out)[:, 3], grid(plain)[:, 3])
    torch.testing.assert_close(grid(out)[:, :3, 0], grid(first)[:, :3, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grid(out)[:, :3, 3], grid(second)[:, :3, 3], rtol=1e-5, atol=1e-6)
    middle = (grid(first)[:, :3, 1:3] + grid(second)[:, :3, 1:3]) / 2
    torch.testing.assert_close(grid(out)[:, :3, 1:3], middle, rtol=1e-5, atol=1e-6)


def test_attending_from_each_prompts_own_positions_equals_attending_from_all(monkeypatch):
    """The gathered path (each prompt attended from the positions it has weight at) gives the dense blend, with
    soft, overlapping and uncovered positions; soft masks over the whole image keep the dense path."""
    attn, processor, hidden, global_states, states = first_layer_inputs(2, batch=2, positions=8 * 8, regions=3)
    masks = torch.stack([box_mask(0, 0, 3, 8, 8), box_mask(2, 0, 6, 5, 8), box_mask(6, 2, 8, 4, 8) * 0.4])
    regional = RegionalAttention(states, masks)
    prompts, index, weights = regional.slots(64, hidden)
    assert prompts.tolist() == [0, 1, 2, 3] and index.shape == (4, 64 - 39)  # 39 positions fully in regions
    assert torch.allclose(weights[3, 0, :4, 0], torch.full((4,), 0.4)) and not weights[3, 0, 4:].any()
    gathered = processor(attn, hidden, global_states, regional_attention=regional)
    soft = masks[2].flatten() > 0  # 0.4 of region 2's output, 0.6 of the global one
    expected = 0.4 * processor(attn, hidden, states[2, 0]) + 0.6 * processor(attn, hidden, global_states)
    torch.testing.assert_close(gathered[:, soft], expected[:, soft], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(RegionalAttention, "slots", lambda self, tokens, like: None)
    dense = processor(attn, hidden, global_states, regional_attention=RegionalAttention(states, masks))
    torch.testing.assert_close(gathered, dense, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    assert RegionalAttention(states[:2], torch.full((2, 8, 8), 0.4)).slots(64, hidden) is None


def test_trainable_regions_pass_gradients_to_their_prompts_and_sampling_reuses_the_projection():
    attn, processor, hidden, global_states, states = first_layer_inputs(3, batch=2, positions=8 * 8, regions=2)
    masks = torch.stack([box_mask(0, 0, 4, 8, 8), box_mask(4, 0, 8, 8, 8)])
    states.requires_grad_(True)
    trained = processor(attn, hidden, global_states, regional_attention=RegionalAttention(states, masks, True))
    trained.square().sum().backward()
    assert states.grad is not None and states.grad[0].abs().sum() > 0 and states.grad[1].abs().sum() > 0
    sampling = RegionalAttention(states, masks)
    out = processor(attn, hidden, global_states, regional_attention=sampling)
    torch.testing.assert_close(out, trained.detach())
    projected = sampling.keys_and_values(0, attn, out.dtype)[0]
    assert not projected.requires_grad and sampling.keys_and_values(0, attn, out.dtype)[0] is projected


def test_masks_follow_every_layer_resolution_of_an_odd_latent():
    regional = RegionalAttention(torch.zeros(1, 1, 1, 77, 8), torch.ones(1, 5, 7))
    for tokens in (35, 12, 4, 1):  # 5x7 -> 3x4 -> 2x2 -> 1x1
        weights, cover = regional.weights(tokens, torch.zeros(1))
        assert weights.shape == (1, 1, tokens, 1) and torch.all(cover == 1)
    with pytest.raises(ValueError, match="positions"):
        regional.weights(11, torch.zeros(1))


def self_attention_inputs(seed, side):
    """The tiny UNet's first self-attention layer, a processor for it and random hidden states `(1, side^2, C)`."""
    unet = tiny_components(0)["unet"]
    attn = next(m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention)
    torch.manual_seed(seed)
    return attn, MixOfShowAttnProcessor(), torch.randn(1, side * side, attn.to_q.in_features)


def test_isolated_regions_do_not_see_each_other_in_self_attention():
    """With `isolate`, a position of the left region does not attend to the right region at all (its output is the
    same whatever the right region holds) but still sees the gap between them; without it, it sees both."""
    attn, processor, hidden = self_attention_inputs(4, side=8)
    masks = torch.stack([box_mask(0, 0, 3, 8, 8), box_mask(5, 0, 8, 8, 8)])  # columns 3 and 4 are in no region
    states = torch.zeros(2, 1, 1, 77, attn.to_q.in_features)  # unused by self-attention
    left, right = (m.flatten().bool() for m in masks)
    gap = ~(left | right)

    def run(features, isolate):
        return processor(attn, features, regional_attention=RegionalAttention(states, masks, isolate=isolate))

    mask = RegionalAttention(states, masks, isolate=True).self_attention_mask(64, hidden)
    blocked = torch.isinf(mask)
    assert torch.equal(blocked, left[:, None] & right[None, :] | right[:, None] & left[None, :])
    new_right, new_gap = hidden.clone(), hidden.clone()
    new_right[:, right] = torch.randn_like(new_right[:, right])
    new_gap[:, gap] = torch.randn_like(new_gap[:, gap])
    isolated = run(hidden, True)
    assert torch.equal(run(new_right, True)[:, left], isolated[:, left])
    assert (run(new_gap, True)[:, left] - isolated[:, left]).abs().mean() > 1e-3
    assert (run(new_right, False)[:, left] - run(hidden, False)[:, left]).abs().mean() > 1e-3
    torch.testing.assert_close(isolated[:, gap], run(hidden, False)[:, gap])  # the gap still sees everything
    plain = processor(attn, hidden)
    torch.testing.assert_close(run(hidden, False), plain)  # without isolation, self-attention ignores regions


# -- the pipeline ---------------------------------------------------------------------------------------------------


def test_one_full_region_with_the_global_prompt_is_plain_sampling(pipe):
    plain = sample(pipe)
    regions = RegionPrompts([PROMPT], [NEGATIVE], torch.ones(1, SIZE, SIZE))
    torch.testing.assert_close(sample(pipe, regions=regions), plain, rtol=0, atol=1e-6)
    assert torch.equal(sample(pipe, regions=None), plain)


def test_isolating_regions_changes_the_image_unless_one_region_covers_it(pipe):
    halves = torch.stack([box_mask(0, 0, SIZE // 2, SIZE), box_mask(SIZE // 2, 0, SIZE, SIZE)])
    regions = lambda masks, isolate: RegionPrompts(["a red cat", "a blue dog"][: len(masks)],
                                                   [NEGATIVE] * len(masks), masks, isolate=isolate)
    assert (sample(pipe, regions=regions(halves, True)) - sample(pipe, regions=regions(halves, False))).abs().mean() \
        > 1e-4
    whole = torch.ones(1, SIZE, SIZE)  # one region everywhere: nothing to keep apart
    torch.testing.assert_close(sample(pipe, regions=regions(whole, True)), sample(pipe, regions=regions(whole, False)))


def test_a_region_prompt_changes_its_box_far_more_than_the_rest(pipe):
    """Measured on the latents. The cross-attention output is exactly local (tests above); the random tiny model's
    self-attention and convolutions then spread part of the change over the whole 16x16 latent (ratio ~1.5 over
    1-10 steps and 3 seeds, measured), so the bar here is 1.3x; the trained toy world is where locality is scored."""
    mask = box_mask(0, 0, SIZE // 2, SIZE)[None]  # left half
    first = sample(pipe, regions=RegionPrompts(["a red cat on a chair"], [NEGATIVE], mask))
    second = sample(pipe, regions=RegionPrompts(["a blue car in the snow, night"], [NEGATIVE], mask))
    difference = (first - second).abs()[0].mean(0)  # (h, w) latents
    inside, outside = difference[:, : difference.shape[1] // 2], difference[:, difference.shape[1] // 2:]
    assert inside.mean() > 1.3 * outside.mean(), (inside.mean(), outside.mean())


def test_region_negative_prompt_is_used_in_the_unconditional_branch(pipe):
    mask = torch.ones(1, SIZE, SIZE)
    a = sample(pipe, regions=RegionPrompts([PROMPT], [NEGATIVE], mask))
    b = sample(pipe, regions=RegionPrompts([PROMPT], ["blurry, dark, ugly"], mask))
    assert (a - b).abs().mean() > 1e-3
    # Without guidance there is no unconditional branch: the region negative prompt changes nothing.
    c = sample(pipe, regions=RegionPrompts([PROMPT], [NEGATIVE], mask), guidance_scale=1.0)
    d = sample(pipe, regions=RegionPrompts([PROMPT], ["blurry, dark, ugly"], mask), guidance_scale=1.0)
    assert torch.equal(c, d)


def test_layer_wise_concepts_work_in_regions(tmp_path):
    components = tiny_components(0)
    pipe = MixOfShowPipeline(**components)
    for i in range(2):
        concept = random_concept(components, (f"<c{i}a>", f"<c{i}b>"), seed=i, lora_std=0.1)
        pipe.load_concept(save_concept(concept, tmp_path / f"c{i}.safetensors"), scale=0.0, name=f"c{i}")
    masks = torch.stack([box_mask(0, 0, SIZE // 2, SIZE), box_mask(SIZE // 2, 0, SIZE, SIZE)])
    regions = RegionPrompts(["a <c0a> <c0b>", "a <c1a> <c1b>"], [NEGATIVE, NEGATIVE], masks)
    image = sample(pipe, prompt="two friends", regions=regions)
    assert torch.isfinite(image).all()
    # The left concept's words reach only the left half (up to the random model's spread, see above): swapping
    # them for the right concept's words changes the left half more.
    swapped = sample(pipe, prompt="two friends", regions=RegionPrompts(["a <c1a> <c1b>", "a <c1a> <c1b>"],
                                                                       [NEGATIVE, NEGATIVE], masks))
    difference = (image - swapped).abs()[0].mean(0)
    half = difference.shape[1] // 2
    assert difference[:, :half].mean() > 1.3 * difference[:, half:].mean()


@pytest.mark.parametrize(("regions", "match"), [
    (RegionPrompts(["a <nobody1> girl"], [""], torch.ones(1, SIZE, SIZE)), r"regions\[0\]\.prompt"),
    (RegionPrompts(["a girl"], ["<ghost>"], torch.ones(1, SIZE, SIZE)), r"regions\[0\]\.negative_prompt"),
    (RegionPrompts(["a girl " * 80], [""], torch.ones(1, SIZE, SIZE)), r"regions\[0\]\.prompt is \d+ tokens"),
    (RegionPrompts(["a girl"], [""], torch.ones(1, SIZE, SIZE // 2)), "region masks"),
    (RegionPrompts(["a girl"], [""], torch.ones(1, SIZE, SIZE), [float("nan")]), r"adapter_weight"),
])
def test_bad_regions_are_refused_before_sampling(pipe, regions, match):
    with pytest.raises(MixOfShowError, match=match):
        sample(pipe, regions=regions)


def test_more_steps_than_the_scheduler_has_are_refused(pipe):
    with pytest.raises(MixOfShowError, match="steps must be an integer from 1 to 1000"):
        sample(pipe, num_inference_steps=1001)


def test_a_too_long_global_prompt_is_refused(pipe):
    with pytest.raises(MixOfShowError, match=r"^prompt is \d+ tokens long"):
        sample(pipe, prompt="a girl " * 80)


def test_region_counts_must_agree():
    with pytest.raises(MixOfShowError, match="one of each per region"):
        RegionPrompts(["a", "b"], [""], torch.ones(2, 4, 4))


# -- spatial conditions ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def condition_image():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", ["t2i_adapter", "controlnet"])
def test_spatial_conditions_change_the_image_and_weight_zero_is_none(pipe, condition_image, kind):
    components = tiny_components(0)
    model = random_t2i_adapter(components) if kind == "t2i_adapter" else random_controlnet(components)
    plain = sample(pipe)
    conditioned = sample(pipe, conditions=[SpatialCondition(model, condition_image, 1.0)])
    assert (conditioned - plain).abs().mean() > 1e-3
    torch.testing.assert_close(sample(pipe, conditions=[SpatialCondition(model, condition_image, 0.0)]), plain,
                               rtol=0, atol=1e-6)
    # Region adapter weights: a region covering everything with adapter weight 0 switches the condition off.
    regions = RegionPrompts([PROMPT], [NEGATIVE], torch.ones(1, SIZE, SIZE), [0.0])
    with_regions = sample(pipe, regions=regions, conditions=[SpatialCondition(model, condition_image, 1.0)])
    torch.testing.assert_close(with_regions, sample(pipe, regions=regions), rtol=0, atol=1e-6)


def test_two_conditions_at_once(pipe, condition_image):
    components = tiny_components(0)
    adapters = [SpatialCondition(random_t2i_adapter(components, seed), condition_image, 0.5) for seed in (1, 2)]
    controlnets = [SpatialCondition(random_controlnet(components, seed), condition_image, 0.5) for seed in (1, 2)]
    for conditions in (adapters, controlnets, [adapters[0], controlnets[0]]):
        both = sample(pipe, conditions=conditions)
        assert not torch.allclose(both, sample(pipe, conditions=conditions[:1]))


def test_region_weight_map():
    masks = torch.stack([box_mask(0, 0, 2, 4, 4), box_mask(1, 0, 3, 4, 4)])
    weight_map = RegionPrompts(["a", "b"], ["", ""], masks, [0.0, 1.0]).weight_map(2.0)[0, 0]
    assert torch.equal(weight_map[:, 0], torch.zeros(4))  # region a only
    assert torch.equal(weight_map[:, 1], torch.ones(4))  # overlap: mean of 0 and 1, times 2
    assert torch.equal(weight_map[:, 2], 2 * torch.ones(4))  # region b only
    assert torch.equal(weight_map[:, 3], 2 * torch.ones(4))  # outside every region: the condition's weight


def test_condition_image_of_the_wrong_size_is_refused(pipe):
    adapter = random_t2i_adapter(tiny_components(0))
    with pytest.raises(MixOfShowError, match=r"conditions\[0\].*resize"):
        sample(pipe, conditions=[SpatialCondition(adapter, torch.rand(1, 3, 16, 16), 1.0, "conditions[0]")])


def test_condition_models_load_from_folders_by_their_class(tmp_path):
    components = tiny_components(0)
    random_t2i_adapter(components, in_channels=1).save_pretrained(tmp_path / "sketch")
    random_controlnet(components).save_pretrained(tmp_path / "controlnet")
    components["unet"].save_pretrained(tmp_path / "unet")
    assert type(load_condition_model(str(tmp_path / "sketch"))).__name__ == "T2IAdapter"
    assert type(load_condition_model(str(tmp_path / "controlnet"))).__name__ == "ControlNetModel"
    with pytest.raises(MixOfShowError, match="not a T2I-Adapter or ControlNet"):
        load_condition_model(str(tmp_path / "unet"))
    with pytest.raises(MixOfShowError, match="cannot read the condition model"):
        load_condition_model(str(tmp_path / "missing"))


# -- layouts end to end ---------------------------------------------------------------------------------------------


def write_layout(tmp_path, regions, conditions=()):
    import yaml

    document = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": SIZE, "height": SIZE, "steps": 3,
                "guidance": 7.5, "seed": 3, "regions": regions, "conditions": list(conditions)}
    path = tmp_path / "scene.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_layout_with_mask_box_and_sketch_adapter(tmp_path):
    components = tiny_components(0)
    random_t2i_adapter(components, in_channels=1).save_pretrained(tmp_path / "sketch")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(
        tmp_path / "sketch.png")
    path = write_layout(tmp_path, [{"prompt": "a red cat", "box": [0.0, 0.0, 0.5, 1.0]},
                                   {"prompt": "a dog", "negative_prompt": "cat", "mask": "mask.png",
                                    "adapter_weight": 0.5}],
                        [{"type": "sketch", "model": "sketch", "image": "sketch.png", "weight": 1.0}])
    layout = load_layout(path)
    pipe = MixOfShowPipeline(**components)
    image = pipe.sample_layout(layout, output_type="np", progress=False).images
    assert image.shape == (1, SIZE, SIZE, 3) and np.isfinite(image).all()
    # The same layout without regions or conditions is plain sampling of its global prompt.
    bare = load_layout(write_layout(tmp_path, []))
    latents = pipe.sample_layout(bare, output_type="latent", progress=False).images
    assert torch.equal(latents, sample(pipe))


def test_layout_with_unknown_concept_word_is_refused_before_models_load(tmp_path, monkeypatch):
    import mixofshow.pipelines.pipeline_mixofshow as module

    def no_loading(*args, **kwargs):
        raise AssertionError("condition models were loaded before the prompts were checked")

    monkeypatch.setattr(module, "load_spatial_conditions", no_loading)
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "pose.png")
    path = write_layout(tmp_path, [{"prompt": "a <nobody1> girl", "box": [0, 0, 16, 32]}],
                        [{"type": "keypose", "model": "some/adapter", "image": "pose.png"}])
    with pytest.raises(MixOfShowError, match=r"regions\[0\]\.prompt"):
        new_pipeline().sample_layout(load_layout(path), progress=False)


def test_regions_pass_through_the_unet_kwargs(pipe):
    """Sanity of the plumbing: the regional object reaches the processors (a wrong mask size fails there)."""
    regional = RegionalAttention(torch.zeros(1, 1, 2, 77, 32), torch.ones(1, 3, 3))
    latents = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="positions"):
        pipe.unet(torch.cat([latents, latents]), 1, encoder_hidden_states=torch.zeros(2, 77, 32),
                  cross_attention_kwargs={REGIONS_KEY: regional})
