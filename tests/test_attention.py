"""Layer-wise attention processor: layer order, parity with diffusers, per-layer routing, attention-map capture."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from mixofshow.attention import (
    LAYERWISE_KEY,
    RECORDER_KEY,
    AttentionMapRecorder,
    MixOfShowAttnProcessor,
    cross_attention_layers,
    install_processors,
)
from mixofshow.testing import tiny_components

NUM_LAYERS = 7
TEXT_LEN = 77
HIDDEN = 32


@pytest.fixture(scope="module")
def unet():
    unet = tiny_components(0)["unet"].eval()
    install_processors(unet)
    return unet


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    states = torch.randn(2, TEXT_LEN, HIDDEN, generator=generator)
    layerwise = torch.randn(NUM_LAYERS, 2, TEXT_LEN, HIDDEN, generator=generator)
    return latents, torch.tensor(10), states, layerwise


def run(unet, latents, t, states, layerwise=None, recorder=None):
    kwargs = {}
    if layerwise is not None:
        kwargs[LAYERWISE_KEY] = layerwise
    if recorder is not None:
        kwargs[RECORDER_KEY] = recorder
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=states, cross_attention_kwargs=kwargs or None).sample


def test_cross_attention_layers_in_down_mid_up_order():
    unet = tiny_components(0)["unet"]
    names = [name for name, _ in cross_attention_layers(unet)]
    assert names == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    ]
    modules = dict(unet.named_modules())
    for name, module in cross_attention_layers(unet):
        assert modules[name] is module
        assert module.is_cross_attention


def test_install_processors_counts_layers_and_indexes_them_in_order():
    unet = tiny_components(0)["unet"]
    assert install_processors(unet) == NUM_LAYERS
    processors = unet.attn_processors
    assert all(isinstance(p, MixOfShowAttnProcessor) for p in processors.values())
    for index, (name, _) in enumerate(cross_attention_layers(unet)):
        assert processors[f"{name}.processor"].layer_index == index
    self_attention = [p for key, p in processors.items() if ".attn1." in key]
    assert self_attention and all(p.layer_index is None for p in self_attention)


def test_identical_layerwise_states_match_stock_processor(inputs):
    latents, t, states, _ = inputs
    unet = tiny_components(0)["unet"].eval()
    install_processors(unet)
    repeated = states[None].repeat(NUM_LAYERS, 1, 1, 1)
    ours = run(unet, latents, t, states, repeated)
    ours_plain = run(unet, latents, t, states)
    unet.set_attn_processor(AttnProcessor2_0())
    stock = run(unet, latents, t, states)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_plain, stock, atol=1e-5, rtol=0)


def test_layerwise_states_override_encoder_states(unet, inputs):
    latents, t, states, layerwise = inputs
    # With layer-wise states given, the plain `encoder_hidden_states` must not matter.
    a = run(unet, latents, t, states, layerwise)
    b = run(unet, latents, t, torch.zeros_like(states), layerwise)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # A single-row layer-wise tensor is shared by all layers.
    shared = run(unet, latents, t, torch.zeros_like(states), states[None])
    torch.testing.assert_close(shared, run(unet, latents, t, states), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [0, 2, 6])
def test_changing_one_layers_states_changes_output(unet, inputs, k):
    latents, t, states, layerwise = inputs
    base = run(unet, latents, t, states, layerwise)
    changed = layerwise.clone()
    changed[k] = torch.randn(changed[k].shape, generator=torch.Generator().manual_seed(99))
    out = run(unet, latents, t, states, changed)
    assert (out - base).abs().max() > 1e-4


def test_each_cross_attention_layer_reads_its_own_states(unet, inputs):
    latents, t, states, layerwise = inputs
    seen = {}
    handles = []
    for index, (_, module) in enumerate(cross_attention_layers(unet)):
        def hook(mod, args, index=index):
            seen.setdefault(index, []).append(args[0].detach().clone())
        handles.append(module.to_k.register_forward_pre_hook(hook))
    try:
        run(unet, latents, t, states, layerwise)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == list(range(NUM_LAYERS))
    for k in range(NUM_LAYERS):
        assert len(seen[k]) == 1
        assert torch.equal(seen[k][0], layerwise[k])


def manual_maps(q_out, k_out, attn, positions):
    """Head-averaged softmax(q k^T * scale), gathered at `positions` (B, K)."""
    batch = q_out.shape[0]
    head_dim = k_out.shape[-1] // attn.heads
    q = q_out.view(batch, -1, attn.heads, head_dim).transpose(1, 2).double()
    k = k_out.view(batch, -1, attn.heads, head_dim).transpose(1, 2).double()
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(dim=1)  # (B, HW, T)
    return torch.stack([probs[b][:, positions[b]] for b in range(batch)])


def test_recorded_maps_match_manual_softmax(unet, inputs):
    latents, t, states, layerwise = inputs
    positions = torch.tensor([[1, 5, 9], [2, 3, 40]])
    captured = {}
    handles = []
    for index, (_, module) in enumerate(cross_attention_layers(unet)):
        for which in ("to_q", "to_k"):
            def hook(mod, args, output, index=index, which=which):
                captured[(index, which)] = output.detach().clone()
            handles.append(getattr(module, which).register_forward_hook(hook))
    recorder = AttentionMapRecorder(positions)
    try:
        recorded_out = run(unet, latents, t, states, layerwise, recorder)
    finally:
        for handle in handles:
            handle.remove()
    plain_out = run(unet, latents, t, states, layerwise)
    torch.testing.assert_close(recorded_out, plain_out, atol=1e-5, rtol=0)

    maps = recorder.maps
    assert len(maps) == NUM_LAYERS
    sizes = [256, 64, 64, 64, 64, 256, 256]  # 16x16 and 8x8 latent positions
    for index, (_, module) in enumerate(cross_attention_layers(unet)):
        m = maps[index]
        assert m.shape == (2, sizes[index], 3)
        assert m.min() >= 0 and m.max() <= 1
        expected = manual_maps(captured[(index, "to_q")], captured[(index, "to_k")], module, positions)
        torch.testing.assert_close(m.double(), expected, atol=1e-6, rtol=1e-5)


def test_recording_without_layerwise_states_matches_plain_output(unet, inputs):
    latents, t, states, _ = inputs
    recorder = AttentionMapRecorder(torch.zeros(2, 1, dtype=torch.long))
    recorded = run(unet, latents, t, states, recorder=recorder)
    torch.testing.assert_close(recorded, run(unet, latents, t, states), atol=1e-5, rtol=0)
    assert len(recorder.maps) == NUM_LAYERS


def test_recorded_maps_over_all_tokens_sum_to_one(unet, inputs):
    latents, t, states, layerwise = inputs
    recorder = AttentionMapRecorder(torch.arange(TEXT_LEN)[None].repeat(2, 1))
    run(unet, latents, t, states, layerwise, recorder)
    assert len(recorder.maps) == NUM_LAYERS
    for m in recorder.maps:
        torch.testing.assert_close(m.sum(dim=-1), torch.ones(m.shape[:2]), atol=1e-5, rtol=0)


def test_recorder_is_per_call_not_processor_state(unet, inputs):
    latents, t, states, layerwise = inputs
    recorder = AttentionMapRecorder(torch.zeros(2, 1, dtype=torch.long))
    run(unet, latents, t, states, layerwise, recorder)
    assert len(recorder.maps) == NUM_LAYERS
    # A later call without the recorder records nothing, and no processor keeps a reference to it.
    run(unet, latents, t, states, layerwise)
    assert len(recorder.maps) == NUM_LAYERS
    for processor in unet.attn_processors.values():
        assert all(value is not recorder for value in vars(processor).values())

    # A call that fails midway leaves nothing behind either.
    layer = cross_attention_layers(unet)[3][1]

    def fail(module, args):
        raise ValueError("boom")

    handle = layer.to_k.register_forward_pre_hook(fail)
    failing = AttentionMapRecorder(torch.zeros(2, 1, dtype=torch.long))
    try:
        with pytest.raises(ValueError, match="boom"):
            run(unet, latents, t, states, layerwise, failing)
    finally:
        handle.remove()
    assert len(failing.maps) == 3  # the layers before the failing one
    run(unet, latents, t, states, layerwise)
    assert len(failing.maps) == 3
