"""The concept file: one safetensors file of layer-wise embeddings, LoRA and JSON metadata; official .pth import."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .attention import cross_attention_layers
from .errors import MixOfShowError
from .lora import LoraWeights

logger = logging.getLogger(__name__)

FORMAT = "mixofshow.concept"
FORMAT_VERSION = 1
METADATA_KEY = "mixofshow"
PARTS = ("text_encoder", "unet")


PROBE_SIZE = 32  # values sampled from each of two base-model tensors to recognise its weights
PROBE_RTOL, PROBE_ATOL = 1e-2, 1e-4  # bfloat16 rounding passes; another model's weights do not


@dataclass(frozen=True)
class BaseFingerprint:
    """What a concept needs from its base model: shapes that must match, and weights that should.

    The weights are recognised by a probe (a few values at fixed places), compared with a tolerance, so the same
    base loaded in float32, float16 or bfloat16 is the same base. `weights_sha256` is what files written before
    the probe carried; it is read and no longer written."""

    cross_attention_layers: int
    text_hidden_size: int
    cross_attention_dim: int
    base_vocab_size: int
    weights_sha256: str = ""
    weights_probe: tuple[float, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "weights_probe", tuple(float(v) for v in self.weights_probe))

    def same_weights(self, model: BaseFingerprint) -> bool | None:
        """Whether `model` has this base's weights; None when the two fingerprints cannot tell."""
        if self.weights_probe and len(self.weights_probe) == len(model.weights_probe):
            return torch.allclose(torch.tensor(self.weights_probe), torch.tensor(model.weights_probe),
                                  rtol=PROBE_RTOL, atol=PROBE_ATOL)
        if self.weights_sha256 and model.weights_sha256:
            return self.weights_sha256 == model.weights_sha256
        return None

    def check(self, model: BaseFingerprint, source: str) -> None:
        """Raise if `model` cannot take a concept made for this base; warn if only the weights differ."""
        for name in ("cross_attention_layers", "text_hidden_size", "cross_attention_dim"):
            want, have = getattr(self, name), getattr(model, name)
            if want and want != have:  # 0: not known (an imported LoRA file cannot tell)
                raise MixOfShowError(
                    f"{source} was trained on another base model: its {name.replace('_', ' ')} is {want}, this "
                    f"model's is {have}. Use the base model the concept was trained on (or retrain the concept)"
                )
        if self.same_weights(model) is False:
            logger.warning(
                "%s was trained on a base model with the same shapes but other weights (a fine-tune of the same "
                "family?): it loads, but may look different than in training", source
            )


def _probe(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    index = torch.arange(PROBE_SIZE, device=flat.device) * (flat.numel() - 1) // (PROBE_SIZE - 1)  # exact ints
    return [float(f"{v:.6g}") for v in flat[index].float().cpu().tolist()]


def fingerprint(tokenizer, text_encoder, unet) -> BaseFingerprint:
    """The fingerprint of a loaded base model (ignores concept tokens already added to it)."""
    table = text_encoder.get_input_embeddings().weight
    base_vocab = text_encoder.config.vocab_size if tokenizer is None else tokenizer.vocab_size
    return BaseFingerprint(
        cross_attention_layers=len(cross_attention_layers(unet)),
        text_hidden_size=text_encoder.config.hidden_size,
        cross_attention_dim=unet.config.cross_attention_dim,
        base_vocab_size=base_vocab,
        weights_probe=tuple(_probe(table[:base_vocab]) + _probe(unet.conv_in.weight)),
    )


@dataclass
class ConceptFile:
    """One concept: its words with layer-wise embeddings, and LoRA on the text encoder and the UNet."""

    words: tuple[str, ...]
    embeddings: dict[str, torch.Tensor]  # word -> (L, D); (1, D) for a word shared by all layers
    text_encoder_lora: LoraWeights
    unet_lora: LoraWeights
    rank: int
    alpha: float  # PEFT convention: the LoRA output is scaled by alpha / rank
    base: BaseFingerprint
    initializers: tuple[str, ...] = ()
    mode: str = "edlora"
    config: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "words": list(self.words),
            "initializers": list(self.initializers),
            "mode": self.mode,
            "rank": self.rank,
            "alpha": self.alpha,
            "layer_count": max(e.shape[0] for e in self.embeddings.values()) if self.embeddings else 0,
            "base": asdict(self.base),
            "config": self.config,
        }


def write_atomically(path: Path, write) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_concept(concept: ConceptFile, path: str | Path) -> Path:
    """Write a concept file (safetensors, written atomically).

    Args:
        concept: the concept.
        path: the `.safetensors` file to write.

    Returns:
        The path written.
    """
    path = Path(path)
    tensors = {f"embeddings.{w}": e.contiguous() for w, e in concept.embeddings.items()}
    for part, weights in (("text_encoder", concept.text_encoder_lora), ("unet", concept.unet_lora)):
        for module, (down, up) in weights.items():
            tensors[f"{part}.{module}.lora_A"] = down.contiguous()
            tensors[f"{part}.{module}.lora_B"] = up.contiguous()
    metadata = {METADATA_KEY: json.dumps(concept.metadata())}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a safetensors file; a clear error if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            return {key: f.get_tensor(key) for key in keys}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise MixOfShowError(f"{path} is not a readable safetensors file ({error})") from None


def load_concept(path: str | Path) -> ConceptFile:
    """Read and validate a concept file: ours (`.safetensors`), an official Mix-of-Show ED-LoRA (`.pth`), or a
    kohya / A1111 / diffusers LoRA file (`mixofshow.interop.import_lora`: a concept without words).

    Args:
        path: the file.

    Returns:
        The `ConceptFile`.
    """
    path = Path(path)
    if not path.is_file():
        raise MixOfShowError(f"concept file {path} does not exist")
    if path.suffix in (".pth", ".pt", ".bin"):
        return import_official(path)
    tensors, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:  # a kohya / A1111 or diffusers LoRA file, or a clear error naming a key
        from .interop import import_lora  # (interop builds on this module)

        return import_lora(path, tensors, metadata)
    try:
        meta = json.loads(metadata[METADATA_KEY])
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"format version {meta['format_version']} is newer than {FORMAT_VERSION}: upgrade")
        base = BaseFingerprint(**meta["base"])
        words = tuple(meta["words"])
        rank, alpha = int(meta["rank"]), float(meta["alpha"])
    except (ValueError, KeyError, TypeError) as error:
        raise MixOfShowError(f"{path}: broken concept metadata ({error})") from None

    embeddings, loras = {}, {part: {} for part in PARTS}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise MixOfShowError(f"{path}: tensor {key!r} holds NaN or infinite values")
        kind, _, rest = key.partition(".")
        if kind == "embeddings":
            embeddings[rest] = tensor
        elif kind in loras and rest.endswith((".lora_A", ".lora_B")):
            module, _, which = rest.rpartition(".")
            loras[kind].setdefault(module, {})[which] = tensor
        else:
            raise MixOfShowError(f"{path}: unexpected tensor {key!r} in a concept file")
    if set(embeddings) != set(words):
        raise MixOfShowError(f"{path}: metadata words {list(words)} do not match embeddings {sorted(embeddings)}")
    lora_pairs = {}
    for part, modules in loras.items():
        for module, pair in modules.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise MixOfShowError(f"{path}: {part}.{module} lacks lora_A or lora_B")
        lora_pairs[part] = {m: (p["lora_A"], p["lora_B"]) for m, p in modules.items()}
    return ConceptFile(
        words=words,
        embeddings=embeddings,
        text_encoder_lora=lora_pairs["text_encoder"],
        unet_lora=lora_pairs["unet"],
        rank=rank,
        alpha=alpha,
        base=base,
        initializers=tuple(meta.get("initializers", ())),
        mode=meta.get("mode", "edlora"),
        config=meta.get("config", {}),
    )


def import_official(path: str | Path, alpha: float = 1.0) -> ConceptFile:
    """Convert an official Mix-of-Show ED-LoRA `.pth` (loaded with `weights_only=True`) to a `ConceptFile`.

    The official file holds `params` -> `new_concept_embedding` {word: (L, D)}, `text_encoder` and `unet`
    {"<module>.lora_down.weight": (r, in), "<module>.lora_up.weight": (out, r)}; its LoRA output is
    `alpha * up(down(x))` with no division by rank, and alpha (1.0 by default) is not stored.

    Args:
        path: the `.pth` file.
        alpha: the official LoRA alpha the concept was trained with.

    Returns:
        The `ConceptFile`; the base fingerprint holds shapes only (the official file records no base model).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- torch raises many types for corrupt or unsafe pickles
        raise MixOfShowError(
            f"{path} could not be read as an official Mix-of-Show .pth with weights_only=True ({error}); "
            "only plain tensor files are accepted"
        ) from None
    params = state.get("params", state) if isinstance(state, dict) else None
    if not isinstance(params, dict) or "new_concept_embedding" not in params:
        raise MixOfShowError(f"{path} is not an official ED-LoRA file: no 'params' -> 'new_concept_embedding'")
    embeddings = {w: e.float() for w, e in params["new_concept_embedding"].items()}
    loras: dict[str, LoraWeights] = {}
    rank = 0
    for part in PARTS:
        pairs: dict[str, dict] = {}
        for key, tensor in params.get(part, {}).items():
            if not key.endswith((".lora_down.weight", ".lora_up.weight")):
                raise MixOfShowError(f"{path}: unexpected {part} key {key!r} (expected lora_down/lora_up weights)")
            module, _, which = key.removesuffix(".weight").rpartition(".")
            pairs.setdefault(module, {})[which] = tensor.float()
        loras[part] = {m: (p["lora_down"], p["lora_up"]) for m, p in pairs.items()}
        rank = rank or next((d.shape[0] for d, _ in loras[part].values()), 0)
    if not embeddings:
        raise MixOfShowError(f"{path}: the official file holds no concept embeddings")
    first = next(iter(embeddings.values()))
    cross_dim = next((down.shape[1] for m, (down, _) in loras["unet"].items() if m.endswith("attn2.to_k")), 0)
    base = BaseFingerprint(
        cross_attention_layers=first.shape[0],
        text_hidden_size=first.shape[1],
        cross_attention_dim=cross_dim or first.shape[1],
        base_vocab_size=0,
    )
    return ConceptFile(
        words=tuple(embeddings),
        embeddings=embeddings,
        text_encoder_lora=loras["text_encoder"],
        unet_lora=loras["unet"],
        rank=rank or 1,
        alpha=alpha * (rank or 1),
        base=base,
        mode="edlora",
        config={"imported_from": str(path)},
    )
