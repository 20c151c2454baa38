"""Per-layer fusion solvers on random matrices: closed form vs brute force, never above W0, prior, ZipLoRA, L-BFGS."""

import itertools

import pytest
import torch

from mixofshow.errors import MixOfShowError
from mixofshow.fusion.solve import (
    GramAccumulator,
    closed_form_delta,
    fusion_objective,
    gradient_fusion,
    gradient_fusion_from_lists,
    lbfgs_fusion,
    merge_columns,
    weight_fusion,
    zip_fusion,
    zip_loss,
    zip_mergers,
)

F64 = torch.float64


def random_layer(seed, out, inn, rows, n, rank=4, dtype=F64):
    """W0 (out, in), LoRA-shaped deltas dW_i = B_i A_i, and explicit features X_i (rows, in) per concept."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inn, generator=g, dtype=F64) / inn**0.5
    deltas = [
        torch.randn(out, rank, generator=g, dtype=F64) @ torch.randn(rank, inn, generator=g, dtype=F64) * 0.1
        for _ in range(n)
    ]
    # Each concept's features have their own mean, as different prompts would.
    xs = [torch.randn(rows, inn, generator=g, dtype=F64) + torch.randn(inn, generator=g, dtype=F64) for _ in range(n)]
    return base.to(dtype), [d.to(dtype) for d in deltas], [x.to(dtype) for x in xs]


def grams_of(xs):
    return [x.T @ x for x in xs]


def relative_error(actual, expected):
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


def stacked_problem(base, deltas, xs):
    """Stacked features X (N, in) and targets Y = X_i (W0 + dW_i)^T (N, out) of the least-squares problem."""
    x = torch.cat(xs)
    y = torch.cat([xi @ (base + d).T for xi, d in zip(xs, deltas)])
    return x, y


# -- closed form vs brute force ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("out, inn, rows, n", [(8, 16, 30, 2), (24, 12, 10, 3), (4, 40, 50, 1), (16, 32, 12, 6)])
def test_closed_form_matches_lstsq_full_rank(seed, out, inn, rows, n):
    base, deltas, xs = random_layer(seed, out, inn, rows, n)
    x, y = stacked_problem(base, deltas, xs)
    assert torch.linalg.matrix_rank(x) == inn
    expected = torch.linalg.lstsq(x, y).solution.T  # argmin_W ||X W^T - Y||
    fused = gradient_fusion_from_lists(base, deltas, grams_of(xs))
    assert relative_error(fused - base, expected - base) < 1e-6


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("out, inn, rows, n", [(16, 64, 20, 1), (16, 64, 10, 2), (8, 48, 5, 6), (40, 24, 7, 3)])
def test_closed_form_is_min_norm_change_when_rank_deficient(seed, out, inn, rows, n):
    base, deltas, xs = random_layer(seed, out, inn, rows, n)
    x, y = stacked_problem(base, deltas, xs)
    assert torch.linalg.matrix_rank(x) < inn
    # min ||D||_F over argmin_D ||X D^T - (Y - X W0^T)||: D^T = X^+ (Y - X W0^T), column by column.
    expected = (torch.linalg.pinv(x) @ (y - x @ base.T)).T
    fused = gradient_fusion_from_lists(base, deltas, grams_of(xs))
    assert relative_error(fused - base, expected) < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("out, inn, rows", [(16, 64, 20), (8, 48, 6), (64, 12, 30), (32, 32, 40)])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_closed_form_never_worse_than_base_or_weight_fusion(seed, out, inn, rows, n):
    base, deltas, xs = random_layer(seed, out, inn, rows, n)
    grams = grams_of(xs)
    at_base = fusion_objective(base, base, deltas, grams)
    closed = fusion_objective(gradient_fusion_from_lists(base, deltas, grams), base, deltas, grams)
    weighted = fusion_objective(weight_fusion(base, deltas), base, deltas, grams)
    tolerance = 1e-9 * at_base
    assert closed <= at_base + tolerance
    assert closed <= weighted + tolerance
    if n > 1:
        assert closed < weighted  # strictly better on these generic layers


@pytest.mark.parametrize("out, inn, rows", [(16, 32, 80), (16, 64, 20), (48, 24, 5)])
def test_one_concept_is_its_own_layer_on_its_inputs(out, inn, rows):
    base, deltas, xs = random_layer(3, out, inn, rows, 1)
    grams = grams_of(xs)
    fused = gradient_fusion_from_lists(base, deltas, grams)
    assert fusion_objective(fused, base, deltas, grams) <= 1e-12 * fusion_objective(base, base, deltas, grams)
    assert relative_error(xs[0] @ fused.T, xs[0] @ (base + deltas[0]).T) < 1e-8
    # W0 + dW also solves it; the closed form is the smallest change that does.
    assert torch.linalg.norm(fused - base) <= torch.linalg.norm(deltas[0]) * (1 + 1e-9)
    if rows < inn:
        assert torch.linalg.norm(fused - base) < 0.9 * torch.linalg.norm(deltas[0])


def test_empty_gram_keeps_base():
    base, _, _ = random_layer(0, 6, 10, 3, 1)
    accumulator = GramAccumulator.zeros(6, 10)
    accumulator.add(torch.randn(6, 10, dtype=F64), torch.zeros(10, 10, dtype=F64))  # a concept with no inputs here
    assert torch.equal(gradient_fusion(base, accumulator), base)


def test_batched_closed_form_equals_per_layer():
    layers = [random_layer(seed, 12, 20, 6, 2) for seed in range(4)]
    accumulators = [GramAccumulator.from_lists(deltas, grams_of(xs)) for _, deltas, xs in layers]
    batched = closed_form_delta(
        torch.stack([a.delta_gram for a in accumulators]), torch.stack([a.gram for a in accumulators])
    )
    for delta_w, accumulator in zip(batched, accumulators):
        single = closed_form_delta(accumulator.delta_gram, accumulator.gram)
        assert relative_error(delta_w, single) < 1e-12


# -- prior ---------------------------------------------------------------------------------------------------------


def prior_problem():
    base, deltas, xs = random_layer(5, 16, 32, 6, 3)  # 18 concept rows < 32 dims
    generic = torch.randn(100, 32, generator=torch.Generator().manual_seed(9), dtype=F64)
    return base, deltas, grams_of(xs), generic.T @ generic


def test_zero_prior_weight_equals_no_prior():
    base, deltas, grams, prior = prior_problem()
    assert torch.equal(
        gradient_fusion_from_lists(base, deltas, grams, prior_gram=prior, prior_weight=0.0),
        gradient_fusion_from_lists(base, deltas, grams),
    )


def test_prior_weight_moves_toward_base_on_prior_inputs():
    base, deltas, grams, prior = prior_problem()
    drift, objective = [], []
    for prior_weight in [0.0, 0.01, 0.1, 1.0, 10.0, 100.0]:
        fused = gradient_fusion_from_lists(base, deltas, grams, prior_gram=prior, prior_weight=prior_weight)
        change = fused - base
        drift.append(float(((change @ prior) * change).sum()))  # tr(D G_p D^T)
        objective.append(fusion_objective(fused, base, deltas, grams))
    for lower, higher in itertools.pairwise(drift):
        assert higher <= lower * (1 + 1e-9)
    for lower, higher in itertools.pairwise(objective):
        assert higher >= lower * (1 - 1e-9)  # the concepts pay for it
    assert drift[-1] < 0.05 * drift[0]


def test_negative_prior_weight_is_refused():
    base, deltas, grams, prior = prior_problem()
    with pytest.raises(MixOfShowError, match="prior_weight"):
        gradient_fusion_from_lists(base, deltas, grams, prior_gram=prior, prior_weight=-1.0)


# -- accumulator ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out, inn, rows, n", [(8, 16, 30, 2), (16, 64, 20, 3), (24, 12, 5, 6)])
def test_accumulator_objective_equals_direct(out, inn, rows, n):
    base, deltas, xs = random_layer(7, out, inn, rows, n)
    grams = grams_of(xs)
    accumulator = GramAccumulator.from_lists(deltas, grams)
    g = torch.Generator().manual_seed(1)
    candidates = [base, weight_fusion(base, deltas), base + torch.randn(out, inn, generator=g, dtype=F64)]
    for weight in candidates:
        direct = fusion_objective(weight, base, deltas, grams)
        assert accumulator.objective(weight - base) == pytest.approx(direct, rel=1e-10)
    # the direct form against the features themselves: sum_i ||X_i (W0 + dW_i)^T - X_i W^T||^2
    for weight in candidates:
        by_features = sum(float(((x @ (base + d).T - x @ weight.T) ** 2).sum()) for x, d in zip(xs, deltas))
        assert fusion_objective(weight, base, deltas, grams) == pytest.approx(by_features, rel=1e-10)


def test_streaming_equals_stacked_statistics_and_list_version():
    base, deltas, xs = random_layer(11, 12, 20, 8, 4)
    grams = grams_of(xs)
    streamed = GramAccumulator.zeros(12, 20)
    for delta, x in zip(deltas, xs):
        streamed.add(delta.float(), (x.T @ x).float().double())  # any dtype in, float64 inside
    assert streamed.count == 4
    assert streamed.gram.dtype == streamed.delta_gram.dtype == F64
    x, y = stacked_problem(base, deltas, xs)
    residual = y - x @ base.T  # rows X_i dW_i^T
    assert relative_error(streamed.gram, x.T @ x) < 1e-6
    assert relative_error(streamed.delta_gram, residual.T @ x) < 1e-6
    assert float(streamed.constant) == pytest.approx(float((residual**2).sum()), rel=1e-6)
    exact = GramAccumulator.from_lists(deltas, grams)
    assert relative_error(gradient_fusion(base, exact), gradient_fusion_from_lists(base, deltas, grams)) < 1e-14
    reverse = GramAccumulator.from_lists(deltas[::-1], grams[::-1])
    assert relative_error(gradient_fusion(base, reverse), gradient_fusion(base, exact)) < 1e-10


def test_accumulator_refuses_wrong_shapes():
    accumulator = GramAccumulator.zeros(4, 6)
    with pytest.raises(MixOfShowError, match="do not fit"):
        accumulator.add(torch.zeros(6, 4), torch.zeros(4, 4))
    with pytest.raises(MixOfShowError, match="one Gram matrix per delta"):
        GramAccumulator.from_lists([torch.zeros(4, 6)], [])


# -- weight fusion -------------------------------------------------------------------------------------------------


def test_weight_fusion_default_is_mean_and_weights_apply():
    base, deltas, _ = random_layer(2, 6, 8, 1, 3)
    assert torch.allclose(weight_fusion(base, deltas), base + sum(deltas) / 3, atol=1e-14)
    assert torch.allclose(
        weight_fusion(base, deltas, [0.2, 0.0, 0.8]), base + 0.2 * deltas[0] + 0.8 * deltas[2], atol=1e-14
    )
    assert weight_fusion(base.float(), [d.float() for d in deltas]).dtype == torch.float32
    with pytest.raises(MixOfShowError, match="2 weights for 3 deltas"):
        weight_fusion(base, deltas, [0.5, 0.5])


# -- ZipLoRA merge -------------------------------------------------------------------------------------------------


def zip_problem(n, seed=0):
    base, deltas, xs = random_layer(seed, 16, 24, 40, n)
    return base, deltas, grams_of(xs)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("lr", [0.01, 10.0])
def test_zip_never_above_its_start(n, lr):
    base, deltas, grams = zip_problem(n)
    accumulator, stacked = GramAccumulator.from_lists(deltas, grams), torch.stack(deltas)
    mergers = zip_mergers(base, deltas, grams, lr=lr)
    assert mergers.shape == (n, 24)
    start = float(zip_loss(torch.ones_like(mergers), stacked, accumulator))
    learnt = float(zip_loss(mergers, stacked, accumulator))
    assert learnt <= start
    if n > 1 and lr == 0.01:
        assert learnt < 0.8 * start
    assert torch.equal(zip_fusion(base, deltas, grams, lr=lr), merge_columns(base, deltas, mergers))


def test_zip_without_steps_is_the_plain_sum():
    base, deltas, grams = zip_problem(3)
    assert relative_error(zip_fusion(base, deltas, grams, steps=0), base + sum(deltas)) < 1e-14


def test_zip_similarity_weight_separates_mergers():
    base, deltas, grams = zip_problem(2)
    overlap = {
        weight: float((zip_mergers(base, deltas, grams, similarity_weight=weight).prod(dim=0)).abs().sum())
        for weight in (0.0, 1.0)
    }
    assert overlap[1.0] < 0.5 * overlap[0.0]
    assert overlap[1.0] < 0.25 * 24  # 24 = the overlap at the start (all mergers 1)


def test_zip_keeps_dtype_and_handles_three_concepts():
    base, deltas, grams = zip_problem(3, seed=4)
    fused = zip_fusion(base.float(), [d.float() for d in deltas], [g.float() for g in grams])
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    at_start = fusion_objective(base + sum(deltas), base, deltas, grams)
    assert fusion_objective(fused.double(), base, deltas, grams) < at_start


# -- L-BFGS reference ----------------------------------------------------------------------------------------------


def test_lbfgs_approaches_closed_form():
    base, deltas, xs = random_layer(8, 24, 32, 200, 3)  # well conditioned: 600 rows for 32 dims
    grams = grams_of(xs)
    at_base = fusion_objective(base, base, deltas, grams)
    closed = fusion_objective(gradient_fusion_from_lists(base, deltas, grams), base, deltas, grams)
    iterative = fusion_objective(lbfgs_fusion(base, deltas, grams), base, deltas, grams)
    assert iterative - closed <= 0.01 * (at_base - closed)
    assert iterative >= closed - 1e-9 * at_base  # the closed form is the minimum


@pytest.mark.parametrize("iterations", [1, 3, 50])
@pytest.mark.parametrize("seed", [0, 1])
def test_lbfgs_never_above_base(iterations, seed):
    base, deltas, xs = random_layer(seed, 16, 64, 8, 3, dtype=torch.float32)
    scales = torch.logspace(0, 4, 64, dtype=F64)  # Gram condition number ~1e8
    grams = grams_of([x.double() * scales for x in xs])
    fused = lbfgs_fusion(base, deltas, grams, iterations=iterations)
    assert fused.dtype == torch.float32
    assert fusion_objective(fused, base, deltas, grams) <= fusion_objective(base, base, deltas, grams)


# -- float32 inputs ------------------------------------------------------------------------------------------------


def near_duplicate_features(seed, out=32, inn=64, rows=10, n=3):
    """float32 layer whose features are nearly the same row with two outlier channels (like padded CLIP prompts).

    The Gram matrix is rank-deficient (30 rows, 64 dims) and, on its range, conditioned far beyond float32.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inn, generator=g)
    deltas = [torch.randn(out, 4, generator=g) @ torch.randn(4, inn, generator=g) * 0.1 for _ in range(n)]
    common = torch.randn(inn, generator=g)
    common[:2] *= 100
    xs = [common + 1e-3 * torch.randn(rows, inn, generator=g) for _ in range(n)]
    return base, deltas, xs


def test_float32_rank_deficient_input_is_solved_in_float64():
    naive_worse = 0
    for seed in range(8):
        base, deltas, xs = near_duplicate_features(seed)
        grams32 = [x.T @ x for x in xs]  # what a float32 client would ship
        exact = [x.double().T @ x.double() for x in xs]  # the features' true Gram matrices, for scoring
        at_base = fusion_objective(base, base, deltas, exact)
        ours = gradient_fusion_from_lists(base, deltas, grams32)
        assert ours.dtype == torch.float32
        assert fusion_objective(ours, base, deltas, exact) <= at_base
        # the trap: float32 normal equations, G D^T = M^T, with a tiny ridge
        gram = sum(grams32)
        moment = sum(d @ g for d, g in zip(deltas, grams32))
        ridge = 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0])
        naive = base + torch.linalg.solve(gram + ridge, moment.T).T
        naive_worse += fusion_objective(naive, base, deltas, exact) > at_base
    assert naive_worse >= 2  # the case really is a trap for a float32 solve


@pytest.mark.parametrize("n", [1, 3])
def test_anchor_changes_only_unexcited_directions(n):
    base, deltas, xs = random_layer(5, out=12, inn=40, rows=10, n=n)  # rank-deficient: 10n rows, 40 dims
    grams = grams_of(xs)
    accumulator = GramAccumulator.from_lists(deltas, grams)
    anchor = weight_fusion(base, deltas) - base
    anchored = gradient_fusion(base, accumulator, anchor=anchor)
    plain = gradient_fusion(base, accumulator)
    assert not torch.allclose(anchored, plain)
    assert fusion_objective(anchored, base, deltas, grams) == pytest.approx(
        fusion_objective(plain, base, deltas, grams), rel=1e-9, abs=1e-12)
    for x in xs:  # identical on every recorded input
        torch.testing.assert_close(x @ anchored.T, x @ plain.T)
    if n == 1:  # one concept anchored at its own delta is its own layer on every input, whatever the cutoff
        torch.testing.assert_close(gradient_fusion(base, accumulator, rcond=0.5, anchor=deltas[0]), base + deltas[0])
