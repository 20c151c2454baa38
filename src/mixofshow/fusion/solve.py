"""Per-layer fusion solvers on tensors: gradient fusion in closed form, weight fusion, ZipLoRA merge, L-BFGS reference.

One linear layer `y = x W^T` with base weight W0 (out, in). Concept i brings its LoRA delta dW_i (out, in) and the
Gram matrix G_i = X_i^T X_i (in, in) of the inputs X_i recorded with its LoRA merged. Mix-of-Show's gradient fusion
minimises

    f(W) = sum_i || X_i (W0 + dW_i)^T - X_i W^T ||_F^2 = sum_i tr((W0 + dW_i - W) G_i (W0 + dW_i - W)^T),

which with D = W - W0, M = sum_i dW_i G_i, G = sum_i G_i and c = sum_i tr(dW_i G_i dW_i^T) is the quadratic
f = c - 2 tr(D M^T) + tr(D G D^T). Only (c, M, G) are needed, so concepts stream through a `GramAccumulator` in
O(out * in + in^2) memory whatever their number. Every solver works in float64 and returns the base weight's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import MixOfShowError

logger = logging.getLogger(__name__)

_TINY = torch.finfo(torch.float64).tiny


def _f64(tensor: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    return tensor.to(device=tensor.device if device is None else device, dtype=torch.float64)


def quadratic_objective(
    delta_w: torch.Tensor, delta_gram: torch.Tensor, gram: torch.Tensor, constant: float | torch.Tensor
) -> torch.Tensor:
    """f(W0 + D) = c - 2 tr(D M^T) + tr(D G D^T), the gradient-fusion objective from its sufficient statistics."""
    return constant - 2 * (delta_w * delta_gram).sum() + ((delta_w @ gram) * delta_w).sum()


@dataclass
class GramAccumulator:
    """Sufficient statistics (c, M, G) of the gradient-fusion objective of one layer, accumulated concept by concept.

    The module's only mutable object: `add` folds one concept in, so memory does not grow with the number of concepts.

    Args:
        delta_gram: M = sum_i dW_i G_i, float64 (out, in).
        gram: G = sum_i G_i, float64 (in, in).
        constant: c = sum_i tr(dW_i G_i dW_i^T), the objective at W0 (a float or a 0-d float64 tensor).
        count: number of concepts added.
    """

    delta_gram: torch.Tensor
    gram: torch.Tensor
    constant: float | torch.Tensor = 0.0
    count: int = 0

    @classmethod
    def zeros(cls, out_features: int, in_features: int, device: torch.device | str | None = None) -> GramAccumulator:
        """An empty accumulator (no concepts) for a layer of shape (out_features, in_features) on `device`."""
        return cls(
            delta_gram=torch.zeros(out_features, in_features, dtype=torch.float64, device=device),
            gram=torch.zeros(in_features, in_features, dtype=torch.float64, device=device),
            constant=torch.zeros((), dtype=torch.float64, device=device),
            count=0,
        )

    @classmethod
    def from_lists(
        cls,
        deltas: Sequence[torch.Tensor],
        grams: Sequence[torch.Tensor],
        device: torch.device | str | None = None,
    ) -> GramAccumulator:
        """An accumulator holding every (dW_i, G_i) pair; `device` defaults to the first delta's."""
        if len(deltas) != len(grams) or not deltas:
            raise MixOfShowError(
                f"need one Gram matrix per delta and at least one, got {len(deltas)} deltas "
                f"and {len(grams)} Gram matrices"
            )
        accumulator = cls.zeros(*deltas[0].shape, device=deltas[0].device if device is None else device)
        for delta, gram in zip(deltas, grams):
            accumulator.add(delta, gram)
        return accumulator

    @property
    def device(self) -> torch.device:
        return self.gram.device

    def add(self, delta: torch.Tensor, gram: torch.Tensor) -> None:
        """Fold in one concept: M += dW_i G_i, G += G_i, c += tr(dW_i G_i dW_i^T), in float64 on this device.

        Args:
            delta: the concept's weight delta dW_i (out, in).
            gram: the Gram matrix G_i = X_i^T X_i (in, in) of its inputs at this layer.
        """
        if delta.shape != self.delta_gram.shape or gram.shape != self.gram.shape:
            raise MixOfShowError(
                f"concept shapes delta {tuple(delta.shape)}, Gram {tuple(gram.shape)} do not fit "
                f"a layer of shape {tuple(self.delta_gram.shape)}"
            )
        delta, gram = _f64(delta, self.device), _f64(gram, self.device)
        product = delta @ gram  # (out, in)
        self.delta_gram = self.delta_gram + product
        self.gram = self.gram + gram
        self.constant = self.constant + (product * delta).sum()
        self.count += 1

    def objective(self, delta_w: torch.Tensor) -> float:
        """f(W0 + delta_w) from (c, M, G) alone.

        Args:
            delta_w: a change D = W - W0 (out, in) of the base weight.

        Returns:
            The gradient-fusion objective at W = W0 + delta_w.
        """
        return float(quadratic_objective(_f64(delta_w, self.device), self.delta_gram, self.gram, self.constant))


def weight_fusion(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Weight fusion, paper eq. (2): W = W0 + sum_i w_i dW_i, with w_i = 1/n unless given.

    Args:
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in).
        weights: one weight per delta; defaults to 1/n each.

    Returns:
        The fused weight in `base`'s dtype and on its device.
    """
    if not deltas:
        raise MixOfShowError("weight fusion needs at least one delta")
    if weights is None:
        weights = [1.0 / len(deltas)] * len(deltas)
    if len(weights) != len(deltas):
        raise MixOfShowError(f"got {len(weights)} weights for {len(deltas)} deltas; give one weight per delta")
    fused = _f64(base)
    for weight, delta in zip(weights, deltas):
        fused = fused + weight * _f64(delta, base.device)
    return fused.to(base.dtype)


def closed_form_delta(
    delta_gram: torch.Tensor,
    gram: torch.Tensor,
    prior_gram: torch.Tensor | None = None,
    prior_weight: float = 0.0,
    rcond: float = 1e-10,
) -> torch.Tensor:
    """D = M (G + lambda G_p)^+, the minimum-norm minimiser of f(W0 + D) + lambda tr(D G_p D^T) (Mix-of-Show eq. 4).

    Solved in float64 through the symmetric eigendecomposition of G + lambda G_p; eigenvalues at or below
    `rcond` times the largest are treated as zero (pseudo-inverse), so directions no concept (nor the prior) excites
    keep W0. Leading batch dimensions are solved together (all layers of one shape at once).

    Args:
        delta_gram: M = sum_i dW_i G_i (..., out, in).
        gram: G = sum_i G_i (..., in, in).
        prior_gram: optional Gram matrix G_p (..., in, in) of generic inputs on which W should stay W0.
        prior_weight: lambda >= 0, the weight of the prior term.
        rcond: relative eigenvalue cutoff of the pseudo-inverse.

    Returns:
        The change D = W - W0 (..., out, in) in float64.
    """
    if prior_weight < 0:
        raise MixOfShowError(f"prior_weight must be >= 0, got {prior_weight}")
    delta_gram, gram = _f64(delta_gram), _f64(gram)
    system = gram
    if prior_gram is not None and prior_weight > 0:
        system = system + prior_weight * _f64(prior_gram, gram.device)
    system = (system + system.mT) / 2  # exact symmetry for eigh
    eigenvalues, eigenvectors = torch.linalg.eigh(system)  # (..., in), (..., in, in)
    cutoff = rcond * eigenvalues.amax(dim=-1, keepdim=True).clamp(min=0)
    keep = eigenvalues > cutoff
    inverse = torch.where(keep, 1 / torch.where(keep, eigenvalues, torch.ones_like(eigenvalues)), 0)
    return ((delta_gram @ eigenvectors) * inverse[..., None, :]) @ eigenvectors.mT


def gradient_fusion(
    base: torch.Tensor,
    accumulator: GramAccumulator,
    prior_gram: torch.Tensor | None = None,
    prior_weight: float = 0.0,
    rcond: float = 1e-10,
    anchor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient fusion in closed form: W = W0 + A + (M - A G) (G + lambda G_p)^+.

    With no anchor (A = 0) this is W0 + M G^+, the point L-BFGS from W0 converges to. An anchor A (e.g. the weight
    fusion delta) only changes W along the Gram's (near-)null directions, which no recorded input excites, so the
    objective is the same; there W becomes W0 + A instead of W0. With one concept and A = dW the result is
    W0 + dW exactly, whatever the cutoff.

    Args:
        base: base weight W0 (out, in).
        accumulator: the layer's statistics (c, M, G) over all concepts.
        prior_gram: optional Gram matrix G_p (in, in) of generic inputs on which W should stay W0 (beyond the paper).
        prior_weight: lambda >= 0, the weight of the prior term lambda tr((W - W0) G_p (W - W0)^T).
        rcond: relative eigenvalue cutoff of the pseudo-inverse.
        anchor: A (out, in), the change kept along the null directions (default 0).

    Returns:
        The fused weight in `base`'s dtype and on its device.
    """
    if accumulator.delta_gram.shape != base.shape:
        raise MixOfShowError(
            f"accumulator of shape {tuple(accumulator.delta_gram.shape)} does not fit the base "
            f"weight of shape {tuple(base.shape)}"
        )
    delta_gram = accumulator.delta_gram
    if anchor is not None:
        anchor = _f64(anchor, accumulator.device)
        delta_gram = delta_gram - anchor @ accumulator.gram
    delta_w = closed_form_delta(delta_gram, accumulator.gram, prior_gram, prior_weight, rcond)
    if anchor is not None:
        delta_w = delta_w + anchor
    return (_f64(base) + delta_w.to(base.device)).to(base.dtype)


def gradient_fusion_from_lists(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], **kwargs
) -> torch.Tensor:
    """`gradient_fusion` on per-concept lists of deltas dW_i and Gram matrices G_i.

    Args:
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in).
        grams: their Gram matrices G_i (in, in), same order.
        **kwargs: `prior_gram`, `prior_weight`, `rcond` of `gradient_fusion`.

    Returns:
        The fused weight in `base`'s dtype.
    """
    return gradient_fusion(base, GramAccumulator.from_lists(deltas, grams, device=base.device), **kwargs)


def fusion_objective(
    weight: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]
) -> float:
    """f(W) = sum_i tr((W0 + dW_i - W) G_i (W0 + dW_i - W)^T), evaluated directly per concept in float64.

    Args:
        weight: the weight W (out, in) to score.
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in).
        grams: their Gram matrices G_i (in, in).

    Returns:
        The objective: summed squared error of W against each concept's tuned layer on that concept's inputs.
    """
    offset = _f64(base) - _f64(weight, base.device)
    total = torch.zeros((), dtype=torch.float64, device=base.device)
    for delta, gram in zip(deltas, grams, strict=True):
        error = offset + _f64(delta, base.device)
        total = total + ((error @ _f64(gram, base.device)) * error).sum()
    return float(total)


def merge_columns(base: torch.Tensor, deltas: Sequence[torch.Tensor], mergers: torch.Tensor) -> torch.Tensor:
    """ZipLoRA merge: W(m) = W0 + sum_i dW_i diag(m_i), each input column of dW_i scaled by its merger coefficient.

    Args:
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in).
        mergers: coefficients m (n, in), one row per delta.

    Returns:
        The merged weight in `base`'s dtype.
    """
    delta_w = _column_merge(torch.stack([_f64(delta, base.device) for delta in deltas]), _f64(mergers, base.device))
    return (_f64(base) + delta_w).to(base.dtype)


def _column_merge(deltas: torch.Tensor, mergers: torch.Tensor) -> torch.Tensor:
    return (deltas * mergers[:, None, :]).sum(dim=0)  # (n, out, in) * (n, 1, in) -> (out, in)


def _similarity(mergers: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} sum_k |m_i[k] m_j[k]|, ZipLoRA's merger-overlap penalty."""
    pairs = torch.triu_indices(len(mergers), len(mergers), offset=1, device=mergers.device)
    return (mergers[pairs[0]] * mergers[pairs[1]]).abs().sum()


def zip_loss(
    mergers: torch.Tensor, deltas: torch.Tensor, accumulator: GramAccumulator, similarity_weight: float = 0.01
) -> torch.Tensor:
    """ZipLoRA loss: f(W(m)) / f0 + lambda sum_{i<j} sum_k |m_i[k] m_j[k]|, with f0 = max(f(W0), tiny).

    The reconstruction term is divided by its value at W0 so that `similarity_weight` means the same on every layer.

    Args:
        mergers: coefficients m (n, in), float64.
        deltas: the stacked deltas dW_i (n, out, in), float64.
        accumulator: the layer's statistics (c, M, G).
        similarity_weight: lambda, the weight of the merger-overlap penalty.

    Returns:
        The loss as a 0-d float64 tensor (differentiable in `mergers`).
    """
    scale = max(float(accumulator.constant), _TINY)
    delta_w = _column_merge(deltas, mergers)
    reconstruction = quadratic_objective(delta_w, accumulator.delta_gram, accumulator.gram, accumulator.constant)
    return reconstruction / scale + similarity_weight * _similarity(mergers)


def zip_mergers(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    steps: int = 100,
    lr: float = 0.01,
    similarity_weight: float = 0.01,
) -> torch.Tensor:
    """Learn ZipLoRA merger coefficients m (n, in) by Adam on `zip_loss`, starting from m = 1 (float64).

    Args:
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in), any n >= 1.
        grams: their Gram matrices G_i (in, in).
        steps: number of Adam steps.
        lr: Adam learning rate.
        similarity_weight: lambda, the weight of the merger-overlap penalty.

    Returns:
        The coefficients of the iterate with the lowest loss, the start included (float64, on `base`'s device).
    """
    accumulator = GramAccumulator.from_lists(deltas, grams, device=base.device)
    stacked = torch.stack([_f64(delta, base.device) for delta in deltas])  # (n, out, in)
    mergers = torch.ones(len(deltas), base.shape[1], dtype=torch.float64, device=base.device, requires_grad=True)
    optimizer = torch.optim.Adam([mergers], lr=lr)
    best, best_loss = mergers.detach().clone(), float("inf")
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = zip_loss(mergers, stacked, accumulator, similarity_weight)
        value = loss.detach().item()  # the loss of the current iterate, before its update
        if value < best_loss:
            best, best_loss = mergers.detach().clone(), value
        if step == steps:
            break
        loss.backward()
        optimizer.step()
    logger.debug("ZipLoRA merge: loss %.6g after %d steps", best_loss, steps)
    return best


def zip_fusion(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    steps: int = 100,
    lr: float = 0.01,
    similarity_weight: float = 0.01,
) -> torch.Tensor:
    """ZipLoRA-style orthogonal merge (the seed report's variant): W0 + sum_i dW_i diag(m_i) with learnt m_i.

    The loss is the gradient-fusion objective divided by its value at W0, plus `similarity_weight` times the
    merger overlap sum_{i<j} sum_k |m_i[k] m_j[k]| (see `zip_loss`); it never ends above its value at m = 1.

    Args:
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in), any n >= 1.
        grams: their Gram matrices G_i (in, in).
        steps: number of Adam steps.
        lr: Adam learning rate.
        similarity_weight: lambda, the weight of the merger-overlap penalty.

    Returns:
        The merged weight in `base`'s dtype.
    """
    return merge_columns(base, deltas, zip_mergers(base, deltas, grams, steps, lr, similarity_weight))


def lbfgs_fusion(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    iterations: int = 500,
    lr: float = 1.0,
    history: int = 25,
) -> torch.Tensor:
    """Gradient fusion the official way: L-BFGS (strong Wolfe) on f(W) from W = W0, in float64.

    Minimises f(W) / max(f(W0), tiny) through the statistics (c, M, G), so the stopping tolerances do not depend on
    the layer's scale. The result is never above W0's objective: W0 is returned if the run ends higher.

    Args:
        base: base weight W0 (out, in).
        deltas: the concepts' deltas dW_i (out, in).
        grams: their Gram matrices G_i (in, in).
        iterations: L-BFGS `max_iter` (official: 500 for text-side layers, 50 for the rest).
        lr: L-BFGS learning rate.
        history: L-BFGS history size.

    Returns:
        The fused weight in `base`'s dtype.
    """
    accumulator = GramAccumulator.from_lists(deltas, grams, device=base.device)
    scale = max(float(accumulator.constant), _TINY)
    delta_w = torch.zeros(base.shape, dtype=torch.float64, device=base.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [delta_w], lr=lr, max_iter=iterations, history_size=history, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = quadratic_objective(delta_w, accumulator.delta_gram, accumulator.gram, accumulator.constant) / scale
        loss.backward()
        return loss

    optimizer.step(closure)
    final = delta_w.detach()
    if accumulator.objective(final) > float(accumulator.constant):
        logger.debug("L-BFGS ended above the objective at W0; keeping W0")
        final = torch.zeros_like(final)
    return (_f64(base) + final).to(base.dtype)
