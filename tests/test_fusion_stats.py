"""Statistics rows weighted by where a concept is drawn: feature grids, subject weights, weighted Grams."""

from __future__ import annotations

import pytest
import torch

from mixofshow import MixOfShowError
from mixofshow.fusion.stats import Guidance, feature_grid, otsu_threshold, record_input_grams, subject_weights


@pytest.mark.parametrize("size, tokens, grid", [((16, 16), 256, (16, 16)), ((16, 16), 16, (4, 4)),
                                                ((9, 7), 20, (5, 4)), ((9, 7), 6, (3, 2))])
def test_feature_grid_follows_the_unet_levels(size, tokens, grid):
    assert feature_grid(tokens, size) == grid


def test_feature_grid_refuses_a_size_that_is_no_level():
    with pytest.raises(MixOfShowError, match="no UNet level"):
        feature_grid(30, (16, 16))


def test_subject_weights_rise_from_background_to_one_where_the_words_are_attended():
    fine = torch.zeros(2, 16, 1)
    fine[0, 5] = 1.0  # image 0: position (1, 1) of a 4x4 map
    fine[1, 10] = 0.5  # image 1: position (2, 2)
    weights = subject_weights([fine], (4, 4), background=0.2)
    assert weights.shape == (2, 4, 4)
    assert weights[0, 1, 1] == pytest.approx(1.0) and weights[1, 2, 2] == pytest.approx(1.0)
    assert weights[0, 3, 3] == pytest.approx(0.2) and weights.min() >= 0.2 - 1e-6
    # a coarser level's map joins the finer one's, scaled up to the latent
    coarse = torch.zeros(2, 4, 1)
    coarse[:, 0] = 1.0
    both = subject_weights([fine, coarse], (4, 4), background=0.2)
    assert both[0, 0, 0] > weights[0, 0, 0]
    assert torch.allclose(subject_weights([fine], (4, 4), background=1.0), torch.ones(2, 4, 4))


def test_otsu_threshold_splits_two_groups_between_them():
    values = torch.tensor([[0.1, 0.12, 0.9, 0.11, 0.95, 0.13], [5.0, 1.0, 1.1, 0.9, 1.0, 1.05]])
    assert otsu_threshold(values).tolist() == pytest.approx([0.13, 1.1])
    # the exact split beats every other on the between-group variance it maximises
    torch.manual_seed(0)
    row = torch.rand(1, 40).double()
    cut = otsu_threshold(row)[0]

    def between(threshold):
        low, high = row[row <= threshold], row[row > threshold]
        return len(low) * len(high) * (low.mean() - high.mean()) ** 2

    assert all(between(cut) >= between(t) - 1e-12 for t in row[0].sort().values[:-1])


def test_subject_mask_is_one_where_attention_is_high_and_background_elsewhere():
    fine = torch.full((1, 16, 2), 0.01)
    fine[0, [5, 6, 9, 10]] = torch.tensor([0.8, 0.6])  # a 2x2 subject in the middle of a 4x4 map, two words
    mask = subject_weights([fine], (4, 4), background=0.1, shape="mask")
    expected = torch.full((1, 4, 4), 0.1)
    expected[0, 1:3, 1:3] = 1.0
    torch.testing.assert_close(mask, expected)
    with pytest.raises(MixOfShowError, match="subject map 'disk'"):
        subject_weights([fine], (4, 4), background=0.1, shape="disk")


def test_weighted_rows_give_the_gram_of_each_row_counted_its_weight():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.randn(2, 16, 3)  # [unconditional; conditional] rows of one image on a 4x4 map
    weights = torch.rand(1, 4, 4) + 0.1
    with record_input_grams(layer, ["0"], guidance=Guidance(scale=5.0), row_weights=weights) as grams:
        layer(x)
    w = weights.flatten()[:, None].double()
    uncond, cond = x.double().unbind(0)
    guided = uncond + 5.0 * (cond - uncond)
    expected = (uncond * w).T @ uncond + (cond * w).T @ cond + (guided * w).T @ guided
    torch.testing.assert_close(grams["0"], expected, rtol=1e-5, atol=1e-5)  # rows are summed in float32
    # weights at the latent size are averaged down to a coarser level's map
    coarse = torch.randn(2, 4, 3)
    with record_input_grams(layer, ["0"], row_weights=weights) as grams:
        layer(coarse)
    pooled = torch.nn.functional.avg_pool2d(weights[None], 2).flatten()[:, None].double()
    rows = coarse.double().reshape(2, 4, 3)
    torch.testing.assert_close(grams["0"], sum((r * pooled).T @ r for r in rows), rtol=1e-5, atol=1e-5)
