"""Tests for the toy world's sketch condition (mixofshow.toyworld.sketch): the outlines, the adapter's fit to the
UNet, its training and files, and sampling under it."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mixofshow.demo import Sketch, concept_pipeline, load_toy_world, sample_targets
from mixofshow.toyworld import Scene, ToyObject
from mixofshow.toyworld.concepts import get_concept
from mixofshow.toyworld.evaluate import Target, composition_target
from mixofshow.toyworld.models import toy_components
from mixofshow.toyworld.sketch import (
    load_sketch_adapter,
    new_sketch_adapter,
    save_sketch_adapter,
    sketch,
    train_sketch_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sketch_outlines_each_class_shape_and_nothing_of_the_concept():
    nova = get_concept("nova")
    scene = Scene("white", (nova.object("right", "middle", "small"),))
    lines = sketch(scene)
    assert lines.dtype == np.float32 and set(np.unique(lines)) == {0.0, 1.0}
    # Only around the object: the left two thirds of the image are empty
    assert lines[:, :40].sum() == 0 and lines.sum() > 20
    # The concept's emblem, pattern, accessory and background do not show: the plain star draws the same lines
    plain = ToyObject("star", "red", "striped", "hat", "right", "middle", "small")
    assert np.array_equal(lines, sketch(Scene("navy", (plain,))))
    # An outline, not a silhouette: the centre of the star is empty
    assert lines[32, 53] == 0
    assert np.array_equal(lines, sketch(scene))  # deterministic


def test_sketch_of_a_layout_holds_every_object():
    layout = composition_target([get_concept(n) for n in ("pip", "rex", "nova")])
    lines = sketch(layout.scene)
    thirds = [lines[:, :21].sum(), lines[:, 22:42].sum(), lines[:, 43:].sum()]
    assert all(t > 20 for t in thirds)
    assert sketch(layout.part(2).scene)[:, :42].sum() == 0


def test_adapter_features_fit_the_unet():
    components = toy_components(seed=0)
    unet = components["unet"]
    adapter = new_sketch_adapter(unet, components["vae"])
    features = adapter(torch.zeros(2, 1, 64, 64))
    assert [f.shape[1] for f in features] == list(unet.config.block_out_channels)
    latents = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    states = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = unet(latents, 10, states).sample
        conditioned = unet(latents, 10, states,
                           down_intrablock_additional_residuals=list(adapter(torch.ones(2, 1, 64, 64)))).sample
    assert conditioned.shape == plain.shape and not torch.allclose(conditioned, plain)


def test_training_reports_held_out_losses_and_the_files_round_trip(tmp_path):
    components = toy_components(seed=0)
    before = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    adapter, report = train_sketch_adapter(components, scenes=20, steps=2, batch_size=2, progress=False)
    assert report["steps"] == 2 and report["held_out"] == 4
    assert np.isfinite(report["held_out_loss_with"]) and np.isfinite(report["held_out_loss_without"])
    assert all(torch.equal(before[k], v) for k, v in components["unet"].state_dict().items())  # base untouched

    assert load_sketch_adapter(tmp_path) is None
    path = save_sketch_adapter(adapter, tmp_path, report)
    assert (path / "training_report.json").is_file()
    loaded = load_sketch_adapter(tmp_path)
    condition = torch.from_numpy(sketch(Scene("white", (ToyObject("circle", "red"),))))[None, None]
    with torch.no_grad():
        for a, b in zip(adapter(condition), loaded(condition)):
            assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)  # fp16 on disk
    save_sketch_adapter(adapter, tmp_path, {**report, "again": True})  # replaces the earlier one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sketch_adapter"]


def test_sampling_under_a_sketch_depends_on_the_sketch():
    _, components, _ = load_toy_world()
    torch.manual_seed(0)
    # untrained: its features still depend on the sketch
    adapter = new_sketch_adapter(components["unet"], components["vae"]).eval()
    pipe = concept_pipeline(components, [])
    blue_star = ToyObject("star", "blue", column="right", size="small")
    target = Target(Scene("white", (blue_star,)))
    settings = {"steps": 3, "guidance": 5.0, "seed": 0, "progress": False}
    plain = sample_targets(pipe, [target], 2, **settings)[0]
    sketched = sample_targets(pipe, [target], 2, sketch=Sketch(adapter, 4.0), **settings)[0]
    moved = Target(Scene("white", (replace(blue_star, column="left"),)))
    sketched_elsewhere = sample_targets(pipe, [moved], 2, sketch=Sketch(adapter, 4.0), **settings)[0]
    difference = [np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).mean()
                  for a, b in zip(plain + sketched, sketched + sketched_elsewhere)]
    assert min(difference) > 0.5
