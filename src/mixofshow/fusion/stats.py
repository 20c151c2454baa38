"""Per-layer input Gram matrices G = X^T X for fusion: recording hooks, a concept's statistics, and their file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
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


@contextmanager
def record_input_grams(model: torch.nn.Module, paths: Iterable[str], grams: dict[str, torch.Tensor] | None = None,
                       guidance: Guidance | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """While open, add `X^T X` (float64) of every input to the named linear layers into `grams`.

    Memory is one `(in, in)` matrix per layer, whatever the number of tokens, steps or prompts. The hooks are
    removed on exit, also after an exception.

    Args:
        model: the model holding the layers.
        paths: module paths of linear layers (PEFT LoRA wrappers included).
        grams: an existing dict to add into (default: a new one).
        guidance: the batch is [unconditional; conditional]: record the guided rows too (see `Guidance`).

    Yields:
        `{path: (in, in) float64 Gram matrix}`.
    """
    grams = {} if grams is None else grams
    last = {}  # the latest input and its Gram: q/k/v projections read the same tensor, one Gram serves all three

    def hook_for(path: str):
        def hook(module, args):
            x = args[0]
            if last.get("input") is not x or last.get("version") != x._version:
                last.update(input=x, version=x._version, gram=gram_rows(x, guidance))
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
