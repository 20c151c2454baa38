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


@contextmanager
def record_input_grams(model: torch.nn.Module, paths: Iterable[str],
                       grams: dict[str, torch.Tensor] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """While open, add `X^T X` (float64) of every input to the named linear layers into `grams`.

    Memory is one `(in, in)` matrix per layer, whatever the number of tokens, steps or prompts. The hooks are
    removed on exit, also after an exception.

    Args:
        model: the model holding the layers.
        paths: module paths of linear layers (PEFT LoRA wrappers included).
        grams: an existing dict to add into (default: a new one).

    Yields:
        `{path: (in, in) float64 Gram matrix}`.
    """
    grams = {} if grams is None else grams

    def hook_for(path: str):
        def hook(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            gram = (rows.T @ rows).double()
            grams[path] = grams[path] + gram if path in grams else gram

        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(hook_for(path)) for path in paths]
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()


def cross_attention_grams(unet, states: torch.Tensor, paths: Iterable[str]) -> dict[str, torch.Tensor]:
    """Grams of the cross-attention K/V inputs: layer k reads the k-th layer-wise encoding.

    Args:
        unet: the UNet (for the layer order).
        states: `(L, B, T, D)` layer-wise prompt encodings as the sampler feeds them (L = 1: shared by all).
        paths: the `attn2.to_k` / `attn2.to_v` paths wanted.

    Returns:
        `{path: (D, D) float64 Gram}`.
    """
    wanted = set(paths)
    grams = {}
    for k, (name, _) in enumerate(cross_attention_layers(unet)):
        rows = states[k if states.shape[0] > 1 else 0].reshape(-1, states.shape[-1]).float()
        gram = None
        for path in (f"{name}.to_k", f"{name}.to_v"):
            if path in wanted:
                gram = (rows.T @ rows).double() if gram is None else gram
                grams[path] = gram
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
