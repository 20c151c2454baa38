"""Per-layer input Gram matrices G = X^T X for fusion: recording hooks, subject weights of their rows, a concept's
statistics, and their file."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..attention import cross_attention_layers
from ..concept_file import read_safetensors, write_atomically
from ..errors import MixOfShowError

STATS_FORMAT = "mixofshow.stats"
PARTS = ("text_encoder", "unet")


@dataclass(frozen=True)
class Guidance:
    """How classifier-free guidance pairs a batch: first half unconditional, second half conditional.

    Besides every input row x, statistics then also record `weight` times the guided rows
    g = x_u + scale (x_c - x_u) of each position pair. The sampler's output is u + scale (c - u): a fused layer
    whose error is the same on x_u and x_c leaves it unchanged, one that fits only x_c does not (measured: without
    these rows, gradient fusion of 3 concepts ends farther from each concept's own guided samples than weight
    fusion; with them, closer).
    """

    scale: float
    weight: float = 1.0


def gram_rows(x: torch.Tensor, guidance: Guidance | None) -> torch.Tensor:
    """`X^T X` of an input batch (float64), plus the guided rows' Gram when `guidance` pairs the batch."""
    rows = x.detach().reshape(-1, x.shape[-1]).float()
    gram = (rows.T @ rows).double()
    if guidance is not None and guidance.weight > 0:
        uncond, cond = rows.chunk(2)
        guided = uncond + guidance.scale * (cond - uncond)
        gram += guidance.weight * (guided.T @ guided).double()
    return gram


def feature_grid(tokens: int, size: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a UNet feature map with `tokens` positions, for a latent of `size` (each UNet level
    halves the sides, rounding up)."""
    height, width = size
    for _ in range(16):
        if height * width == tokens:
            return height, width
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    raise MixOfShowError(f"a feature map of {tokens} positions is no UNet level of a {size[0]}x{size[1]} latent")


SUBJECT_MAPS = ("linear", "mask")  # how `subject_weights` turns attention into row weights


def subject_weights(maps: Sequence[torch.Tensor], size: tuple[int, int], background: float,
                    shape: str = "linear") -> torch.Tensor:
    """Per-position weights of statistics rows from the concept words' cross-attention maps.

    Args:
        maps: `(B, HW, K)` attention maps of K concept-word positions, one per cross-attention layer call
            (`AttentionMapRecorder.maps`), at any UNet level of the latent.
        size: the latent's (height, width).
        background: the weight where the words are not attended.
        shape: "linear": the weight rises linearly with the mean map (over words, layers and steps) to 1 where it
            is highest; "mask": 1 where the mean map is above the threshold that best splits it in two
            (`otsu_threshold`), `background` elsewhere.

    Returns:
        `(B, height, width)` weights in [background, 1].
    """
    if shape not in SUBJECT_MAPS:
        raise MixOfShowError(f"subject map {shape!r}: choose one of {', '.join(SUBJECT_MAPS)}")
    total = torch.zeros(maps[0].shape[0], 1, *size)
    for attention in maps:
        height, width = feature_grid(attention.shape[1], size)
        grid = attention.detach().float().mean(dim=-1).reshape(-1, 1, height, width).cpu()
        total += F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    total = total[:, 0]
    if shape == "mask":
        above = total > otsu_threshold(total.flatten(1))[:, None, None]
        return torch.where(above, 1.0, background)
    peak = total.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return background + (1 - background) * (total / peak[:, None, None])


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Per row of `(B, N)` values, the threshold that splits them into a low and a high group with the largest
    between-group variance (Otsu's method, exact over the sorted values): `(B,)`, the largest low value."""
    ordered = values.double().sort(dim=1).values
    count = ordered.shape[1]
    low_n = torch.arange(1, count, dtype=torch.float64)  # the low group holds the first k values, k = 1..N-1
    low_sum = ordered.cumsum(dim=1)[:, :-1]
    high_sum = ordered.sum(dim=1, keepdim=True) - low_sum
    between = low_n * (count - low_n) * (low_sum / low_n - high_sum / (count - low_n)) ** 2
    split = between.argmax(dim=1)
    return ordered.gather(1, split[:, None])[:, 0].to(values.dtype)


def weighted_rows(x: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """`(B', N, C)` UNet-layer inputs with each position's row times the square root of its weight (so its Gram
    counts the row `weight` times); `row_weights` `(B, h, w)` at the latent size, B' = B or 2B (guidance pairs)."""
    height, width = feature_grid(x.shape[1], tuple(row_weights.shape[-2:]))
    pooled = F.adaptive_avg_pool2d(row_weights[:, None].float(), (height, width)).flatten(1)  # (B, N)
    pooled = pooled.repeat(x.shape[0] // pooled.shape[0], 1)
    return x * pooled.sqrt().to(x)[..., None]


@contextmanager
def record_input_grams(model: torch.nn.Module, paths: Iterable[str], grams: dict[str, torch.Tensor] | None = None,
                       guidance: Guidance | None = None,
                       row_weights: torch.Tensor | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """While open, add `X^T X` (float64) of every input to the named linear layers into `grams`.

    Memory is one `(in, in)` matrix per layer, whatever the number of tokens, steps or prompts. The hooks are
    removed on exit, also after an exception.

    Args:
        model: the model holding the layers.
        paths: module paths of linear layers (PEFT LoRA wrappers included).
        grams: an existing dict to add into (default: a new one).
        guidance: the batch is [unconditional; conditional]: record the guided rows too (see `Guidance`).
        row_weights: `(B, h, w)` weights of a UNet's spatial rows at the latent size (`subject_weights`), or None
            for every row alike.

    Yields:
        `{path: (in, in) float64 Gram matrix}`.
    """
    grams = {} if grams is None else grams
    last = {}  # the latest input and its Gram: q/k/v projections read the same tensor, one Gram serves all three

    def hook_for(path: str):
        def hook(module, args):
            x = args[0]
            if last.get("input") is not x or last.get("version") != x._version:
                rows = x if row_weights is None else weighted_rows(x, row_weights)
                last.update(input=x, version=x._version, gram=gram_rows(rows, guidance))
            gram = last["gram"]
            grams[path] = grams[path] + gram if path in grams else gram.clone()

        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(hook_for(path)) for path in paths]
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()
        last.clear()


def cross_attention_grams(unet, states: torch.Tensor, paths: Iterable[str],
                          guidance: Guidance | None = None) -> dict[str, torch.Tensor]:
    """Grams of the cross-attention K/V inputs: layer k reads the k-th layer-wise encoding.

    Args:
        unet: the UNet (for the layer order).
        states: `(L, B, T, D)` layer-wise prompt encodings as the sampler feeds them (L = 1: shared by all).
        paths: the `attn2.to_k` / `attn2.to_v` paths wanted.
        guidance: the batch is [negatives; prompts]: record the guided rows too (see `Guidance`).

    Returns:
        `{path: (D, D) float64 Gram}`.
    """
    wanted = set(paths)
    grams = {}
    for k, (name, _) in enumerate(cross_attention_layers(unet)):
        layer_paths = [p for p in (f"{name}.to_k", f"{name}.to_v") if p in wanted]
        if layer_paths:
            gram = gram_rows(states[k if states.shape[0] > 1 else 0], guidance)
            grams.update({p: gram for p in layer_paths})
    return grams


@dataclass
class ConceptStatistics:
    """One concept's Gram matrices, recorded with its own LoRA: text-encoder layers and UNet layers (no K/V)."""

    grams: dict[str, dict[str, torch.Tensor]] = field(default_factory=lambda: {part: {} for part in PARTS})
    metadata: dict = field(default_factory=dict)  # base fingerprint, concept hash, prompts, sampling settings

    def save(self, path: str | Path) -> Path:
        """Write a statistics file (safetensors, float64, written atomically)."""
        path = Path(path)
        tensors = {f"{part}.{module}": g.contiguous() for part, grams in self.grams.items()
                   for module, g in grams.items()}
        meta = {"format": STATS_FORMAT, **self.metadata}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={STATS_FORMAT: json.dumps(meta)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConceptStatistics:
        """Read a statistics file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise MixOfShowError(f"statistics file {path} does not exist")
        tensors, metadata = read_safetensors(path)
        if STATS_FORMAT not in metadata:
            raise MixOfShowError(f"{path} is not a mixofshow statistics file: make one with `mixofshow stats`")
        stats = cls(metadata=json.loads(metadata[STATS_FORMAT]))
        for key, tensor in tensors.items():
            part, _, module = key.partition(".")
            if part not in stats.grams or tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
                raise MixOfShowError(f"{path}: unexpected tensor {key!r} {tuple(tensor.shape)}")
            if not torch.isfinite(tensor).all():
                raise MixOfShowError(f"{path}: tensor {key!r} holds NaN or infinite values")
            stats.grams[part][module] = tensor.double()
        return stats
