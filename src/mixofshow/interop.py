"""Foreign formats: concept files out to diffusers / kohya / A1111, their LoRA files in as concept files, and a fused
model folder out as one original-layout Stable Diffusion checkpoint.

Export keeps the LoRA exact (any alpha / rank difference is folded so every reader computes the same weights); the
layer-wise ED-LoRA embeddings become one textual-inversion file per word holding the *mean over the layers*, because
textual inversion has one vector per token and no notion of layers (the files and the command say so).

Import reads kohya / A1111 (`lora_unet_…`, `lora_te_…`) and diffusers / PEFT (`unet.….lora_A.weight`) LoRA files as
concept files with no words: `load_concept` dispatches here for a safetensors file without our metadata, so
`MixOfShowPipeline.load_concept` and `mixofshow fuse` (with trigger `prompts`) take them. Only the linears our LoRA
lives on are read (attention and feed-forward); a kohya file's other layers (projections, convolutions) are skipped
with a warning that counts them (see `import_lora`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .concept_file import BaseFingerprint, ConceptFile, load_concept, read_safetensors, write_atomically
from .errors import MixOfShowError
from .lora import LoraWeights

logger = logging.getLogger(__name__)

LORA_FORMATS = ("diffusers", "kohya", "a1111")
EXPORT_FORMATS = (*LORA_FORMATS, "single-file")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name `load_lora_weights(folder)` looks for
EMBEDDINGS_FOLDER = "embeddings"
MANIFEST_SUFFIX = ".concepts.json"

# The layers our LoRA lives on (`lora.UNET_TARGET_PATTERNS`: attention, and feed-forward with `attention_ff`), as
# diffusers / transformers module paths (text encoder without `text_model.`).
UNET_LORA_LAYER = re.compile(
    r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2))")
TEXT_ATTENTION = re.compile(r"encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj")

# kohya names: the module path with "." -> "_" behind a prefix; parsed back with these (underscores are ambiguous).
KOHYA_UNET_LORA_LAYER = re.compile(
    r"lora_unet_(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_(\d+)_transformer_blocks_(\d+)_"
    r"(attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_(?:0_proj|2))")
KOHYA_LAYER_NAMES = {"to_out_0": "to_out.0", "ff_net_0_proj": "ff.net.0.proj", "ff_net_2": "ff.net.2"}
KOHYA_TEXT_ATTENTION = re.compile(r"lora_te_(?:text_model_)?encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj")
# Other SD1.x/2.x layers a kohya file may train (projections, resnets, text-encoder MLPs, ...): skipped, not refused.
KOHYA_OTHER_SD_LAYER = re.compile(
    r"lora_unet_(?:(?:down_blocks|up_blocks)_\d+_|mid_block_|conv_in|conv_out|time_embedding_)"
    r"|lora_te_(?:text_model_)?encoder_layers_\d+_mlp_fc[12]")
# SDXL's kohya files: two text encoders, and the original (SGM) UNet block names.
KOHYA_SDXL = re.compile(r"lora_te[12]_|lora_unet_(?:input_blocks|middle_block|output_blocks|label_emb)_")
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")

# diffusers / PEFT names: `<part>.<module path>.lora_A.weight` / `.lora_B.weight`.
DIFFUSERS_KEY = re.compile(r"(unet|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight")
DIFFUSERS_OTHER_ARCHITECTURE = re.compile(r"(?:text_encoder_2|transformer|prior|decoder)\.")
DIFFUSERS_LORA_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LoraConfig per part, prefixed "unet." etc.

# modelspec (the Stability AI safetensors metadata convention kohya and A1111 read)
MODELSPEC_VERSION = "1.0.0"
IMPL_DIFFUSERS_LAYOUT = "diffusers"  # what kohya writes for SD1.x/2.x LoRA
IMPL_ORIGINAL_LAYOUT = "https://github.com/Stability-AI/generative-models"  # checkpoints and embeddings


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote, and what the user should know about it (e.g. averaged embeddings)."""

    files: tuple[Path, ...]
    notes: tuple[str, ...] = field(default=())


class LoraFingerprint(BaseFingerprint):
    """The base model a LoRA file implies: only the sizes its tensors show (0 = not shown), each with the key it was
    read from, so a mismatch names that key."""

    def __init__(self, text_hidden_size: int = 0, cross_attention_dim: int = 0, evidence: dict | None = None):
        super().__init__(cross_attention_layers=0, text_hidden_size=text_hidden_size,
                         cross_attention_dim=cross_attention_dim, base_vocab_size=0)
        object.__setattr__(self, "evidence", dict(evidence or {}))

    def check(self, model: BaseFingerprint, source: str) -> None:
        for name, key in self.evidence.items():
            want, have = getattr(self, name), getattr(model, name)
            if want and want != have:
                raise MixOfShowError(
                    f"{source}: key {key!r} implies a {name.replace('_', ' ')} of {want}, this model's is {have}: the "
                    "LoRA was made for another model architecture (e.g. SDXL); use it with the base it was made for"
                )


# -- export ---------------------------------------------------------------------------------------------------------


def kohya_module_name(part: str, path: str) -> str:
    """The kohya / A1111 name of a module: `lora_unet_<path with _>`, or `lora_te_text_model_<path with _>` (the
    transformers-4 layout of SD1.x text encoders that kohya names)."""
    if part == "unet":
        return "lora_unet_" + path.replace(".", "_")
    return "lora_te_text_model_" + path.removeprefix("text_model.").replace(".", "_")


def diffusers_module_key(part: str, path: str) -> str:
    """The key prefix of a module in a diffusers LoRA file (text encoder in the transformers-4 layout with
    `text_model.`, which every diffusers version reads)."""
    if part == "unet":
        return f"unet.{path}"
    return f"text_encoder.text_model.{path.removeprefix('text_model.')}"


def _file_stem(text: str, fallback: str) -> str:
    stem = re.sub(r"[^\w.-]+", "", text).strip(".")
    return stem or fallback


def _averaged(concept: ConceptFile) -> dict[str, torch.Tensor]:
    """Each word's embedding as one vector `(D,)`: the mean over its layer-wise rows."""
    return {word: rows.float().mean(dim=0) for word, rows in concept.embeddings.items()}


def _average_note(concept: ConceptFile) -> str | None:
    layers = max((rows.shape[0] for rows in concept.embeddings.values()), default=1)
    if layers <= 1:
        return None
    return (f"ED-LoRA keeps {layers} embeddings per word (one per cross-attention layer); textual inversion holds one "
            f"vector, so each embedding file holds the mean over the {layers} layers: the concept will look less "
            "like itself than in mixofshow")


def _architecture(cross_attention_dim: int) -> tuple[str, str]:
    """(kohya `ss_base_model_version`, modelspec architecture) of an SD1.x/2.x model; SD2 attends to 1024-wide
    text."""
    if cross_attention_dim == 1024:
        return "sd_v2", "stable-diffusion-v2-512"
    return "sd_v1", "stable-diffusion-v1"


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _embedding_paths(words: tuple[str, ...], folder: Path, taken: set[str] | None = None) -> dict[str, Path]:
    """One file per word, named after the word without characters file systems refuse (`<hina1>` -> `hina1`), none
    named as in `taken` (e.g. the LoRA file beside them)."""
    paths, taken = {}, set(taken or ())
    for index, word in enumerate(words):
        stem = _file_stem(word, f"word{index}")
        while stem in taken:
            stem += "_"
        taken.add(stem)
        paths[word] = folder / f"{stem}.safetensors"
    return paths


def export_diffusers(concept: ConceptFile, out: str | Path, name: str = "concept") -> ExportResult:
    """A diffusers LoRA folder: `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(out)`) plus one
    textual-inversion file per word in `embeddings/` (`pipe.load_textual_inversion(file)`).

    diffusers reads `lora_alpha` from the file's adapter metadata or else takes alpha = rank (scale 1); this file has
    no adapter metadata and holds `B * alpha / rank`, so every reader gets the concept's weights exactly.

    Args:
        concept: the concept.
        out: the folder to write (created).
        name: the concept's name, recorded in the metadata.

    Returns:
        The files written and notes for the user.
    """
    out = Path(out)
    if out.suffix == ".safetensors":
        raise MixOfShowError(f"--out for the diffusers format is a folder (it holds {DIFFUSERS_LORA_FILE} and the "
                             f"embeddings), got the file name {out}")
    scale = concept.alpha / concept.rank
    tensors = {}
    for part, weights in (("unet", concept.unet_lora), ("text_encoder", concept.text_encoder_lora)):
        for path, (down, up) in weights.items():
            key = diffusers_module_key(part, path)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up * scale
    files, notes = [], []
    about = {"name": name, "words": list(concept.words), "rank": concept.rank,
             "note": f"alpha/rank = {scale:g} folded into lora_B; read with alpha = rank"}
    if tensors:
        metadata = {"format": "pt", "mixofshow.export": json.dumps(about)}
        files.append(_save(tensors, out / DIFFUSERS_LORA_FILE, metadata))
    else:
        notes.append("the concept has no LoRA weights: no LoRA file written")
    average = _average_note(concept)
    vectors = _averaged(concept)
    for word, path in _embedding_paths(concept.words, out / EMBEDDINGS_FOLDER).items():
        vector = vectors[word]
        about = {"word": word, "from": name, "layers_averaged": concept.embeddings[word].shape[0]}
        files.append(_save({word: vector}, path, {"format": "pt", "mixofshow.export": json.dumps(about)}))
    if average:
        notes.append(average)
    if concept.words:
        notes.append(f"diffusers: pipe.load_lora_weights('{out}'), then pipe.load_textual_inversion(file) for each "
                     f"file in {out / EMBEDDINGS_FOLDER}; prompt with {' '.join(concept.words)}")
    return ExportResult(tuple(files), tuple(notes))


def export_kohya(concept: ConceptFile, out: str | Path, name: str = "concept", layout: str = "kohya"
                 ) -> ExportResult:
    """A kohya / A1111 LoRA file (`lora_unet_…` / `lora_te_…` with `.lora_down.weight`, `.lora_up.weight`,
    `.alpha`; scale = alpha / rank as in PEFT) plus one A1111 embedding file (`emb_params` `[1, D]`) per word.

    Args:
        concept: the concept.
        out: a `.safetensors` file (the LoRA; embeddings beside it), or a folder: kohya writes `<name>.safetensors`
            and the embeddings into it, a1111 writes the webui's layout, `models/Lora/<name>.safetensors` and
            `embeddings/<word>.safetensors` (copy it onto the webui folder).
        name: the LoRA's name (its file name in a folder; A1111 prompts use `<lora:name:1>`).
        layout: "kohya" or "a1111" (the same tensors; only the folder layout differs).

    Returns:
        The files written and notes for the user.
    """
    out = Path(out)
    if out.suffix == ".safetensors":
        lora_path, embedding_folder = out, out.parent
    elif layout == "a1111":
        lora_path, embedding_folder = out / "models" / "Lora" / f"{name}.safetensors", out / EMBEDDINGS_FOLDER
    else:
        lora_path, embedding_folder = out / f"{name}.safetensors", out
    version, architecture = _architecture(concept.base.cross_attention_dim)
    stamp = int(time.time())
    tensors = {}
    for part, weights in (("unet", concept.unet_lora), ("text_encoder", concept.text_encoder_lora)):
        for path, (down, up) in weights.items():
            module = kohya_module_name(part, path)
            tensors[f"{module}.lora_down.weight"] = down
            tensors[f"{module}.lora_up.weight"] = up
            tensors[f"{module}.alpha"] = torch.tensor(float(concept.alpha))
    files, notes = [], []
    common = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stamp)),
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
    }
    average = _average_note(concept)
    if tensors:
        metadata = {
            **common,
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": IMPL_DIFFUSERS_LAYOUT,
            "modelspec.title": name,
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(concept.rank),
            "ss_network_alpha": str(float(concept.alpha)),
            "ss_base_model_version": version,
            "ss_v2": str(version == "sd_v2"),
            "ss_output_name": name,
            "ss_network_args": json.dumps({}),
            "ss_training_comment": (f"exported by mixofshow; trigger words {' '.join(concept.words) or '(none)'} "
                                    "come as textual-inversion embeddings" + (f" ({average})" if average else "")),
        }
        files.append(_save(tensors, lora_path, metadata))
    else:
        notes.append("the concept has no LoRA weights: no LoRA file written")
    triggers, vectors = [], _averaged(concept)
    reserved = {lora_path.stem} if embedding_folder == lora_path.parent else set()
    for word, path in _embedding_paths(concept.words, embedding_folder, reserved).items():
        rows = concept.embeddings[word]
        metadata = {
            **common,
            "modelspec.architecture": f"{architecture}/textual-inversion",
            "modelspec.implementation": IMPL_ORIGINAL_LAYOUT,
            "modelspec.title": path.stem,
            "mixofshow.word": word,
            "mixofshow.layers_averaged": str(rows.shape[0]),
            "mixofshow.note": average or "one embedding, as trained",
        }
        files.append(_save({"emb_params": vectors[word][None]}, path, metadata))
        triggers.append(path.stem)
    if average:
        notes.append(average)
    if files:
        loras = f"<lora:{lora_path.stem}:1> " if tensors else ""
        notes.append(f"A1111 / ComfyUI: the LoRA goes in models/Lora, the embeddings in embeddings/; an embedding's "
                     f"trigger is its file name: prompt with {loras}{' '.join(triggers)}".rstrip())
    return ExportResult(tuple(files), tuple(notes))


def export_concept(concept: str | Path | ConceptFile, fmt: str, out: str | Path, name: str | None = None
                   ) -> ExportResult:
    """Export a concept file for other tools.

    Args:
        concept: a concept file (ours, an official `.pth`, or a LoRA file `load_concept` reads) or a `ConceptFile`.
        fmt: "diffusers", "kohya" or "a1111".
        out: where to write (see `export_diffusers` and `export_kohya`).
        name: the exported LoRA's name (default: the concept file's stem, or "concept").

    Returns:
        The files written and notes for the user.
    """
    if fmt not in LORA_FORMATS:
        raise MixOfShowError(f"unknown export format {fmt!r}; choose one of {', '.join(LORA_FORMATS)}")
    if name is None:
        name = Path(concept).stem if not isinstance(concept, ConceptFile) else "concept"
    name = _file_stem(name, "concept")
    concept = concept if isinstance(concept, ConceptFile) else load_concept(concept)
    if fmt == "diffusers":
        return export_diffusers(concept, out, name)
    return export_kohya(concept, out, name, layout=fmt)


# -- import ---------------------------------------------------------------------------------------------------------


def lora_format(keys) -> str | None:
    """"kohya" (also A1111's), "diffusers" (PEFT-style keys), or None, from a file's tensor names."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder")) and "lora" in k for k in keys):
        return "diffusers"
    return None


def _kohya_module(name: str) -> tuple[str, str] | None:
    """(part, module path) of a kohya module name on a linear our LoRA lives on, else None."""
    match = KOHYA_UNET_LORA_LAYER.fullmatch(name)
    if match:
        block, attention, transformer, layer = match.groups()
        block = block.replace("_blocks_", "_blocks.")
        if layer.startswith("attn"):
            attn, _, projection = layer.partition("_")
            layer = f"{attn}.{KOHYA_LAYER_NAMES.get(projection, projection)}"
        else:
            layer = KOHYA_LAYER_NAMES[layer]
        return "unet", f"{block}.attentions.{attention}.transformer_blocks.{transformer}.{layer}"
    match = KOHYA_TEXT_ATTENTION.fullmatch(name)
    if match:
        layer, projection = match.groups()
        return "text_encoder", f"encoder.layers.{layer}.self_attn.{projection}_proj"
    return None


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MixOfShowError(f"{path}: tensor {key!r} holds NaN or infinite values: the file is broken")


def _read_kohya(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """`{part: {module: (A, B, scale, key)}}` and the skipped module names of a kohya file."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if KOHYA_SDXL.match(name):
            raise MixOfShowError(
                f"{path}: key {key!r} belongs to an SDXL LoRA (two text encoders, original UNet block names); only "
                "Stable Diffusion 1.x/2.x LoRAs fit this model"
            )
        if not name.startswith(("lora_unet_", "lora_te_")) or suffix not in KOHYA_SUFFIXES:
            what = "DoRA / LyCORIS tensors are not supported" if name.startswith("lora_") else "not a kohya LoRA key"
            raise MixOfShowError(f"{path}: unknown key {key!r} ({what}); expected <module>.lora_down.weight, "
                                 ".lora_up.weight and .alpha")
        modules.setdefault(name, {})[suffix] = tensor
    loras: dict[str, dict] = {"text_encoder": {}, "unet": {}}
    skipped = []
    for name, parts in modules.items():
        target = _kohya_module(name)
        if target is None:
            if KOHYA_OTHER_SD_LAYER.match(name):
                skipped.append(name)
                continue
            raise MixOfShowError(f"{path}: key {name + '.lora_down.weight'!r} names no layer of a Stable Diffusion "
                                 "1.x/2.x model: the LoRA was made for another model architecture")
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise MixOfShowError(f"{path}: module {name!r} lacks lora_down.weight or lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise MixOfShowError(f"{path}: key {name + '.lora_down.weight'!r} has shapes down {tuple(down.shape)}, "
                                 f"up {tuple(up.shape)}: not a linear LoRA pair")
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)  # kohya: no alpha means alpha = rank
        part, module = target
        loras[part][module] = (down, up, alpha / rank, f"{name}.lora_down.weight")
    return loras, skipped


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern`: the value of the first pattern naming `module` (or its end)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def _read_diffusers(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[dict, list]:
    """`{part: {module: (A, B, scale, key)}}` and the skipped module paths of a diffusers / PEFT file."""
    try:
        adapter = json.loads(metadata.get(DIFFUSERS_LORA_ADAPTER_METADATA, "{}"))
    except ValueError as error:
        raise MixOfShowError(f"{path}: broken {DIFFUSERS_LORA_ADAPTER_METADATA} metadata ({error})") from None
    pairs: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        if DIFFUSERS_OTHER_ARCHITECTURE.match(key):
            raise MixOfShowError(f"{path}: key {key!r} belongs to a model with another architecture (SDXL's second "
                                 "text encoder, or a transformer-based model); only Stable Diffusion 1.x/2.x "
                                 "LoRAs fit this model")
        match = DIFFUSERS_KEY.fullmatch(key)
        if match is None:
            hint = " (the old attention-processor format: load it in diffusers and save it again)" \
                if ".processor." in key or "lora_linear_layer" in key else ""
            raise MixOfShowError(f"{path}: unknown key {key!r}{hint}; expected unet.<module>.lora_A.weight / "
                                 "lora_B.weight and text_encoder.<module>.lora_A.weight / lora_B.weight")
        part, module, which = match.groups()
        if part == "text_encoder":
            module = module.removeprefix("text_model.")
        pairs.setdefault((part, module), {})[which] = (key, tensor)
    loras: dict[str, dict] = {"text_encoder": {}, "unet": {}}
    skipped = []
    for (part, module), found in pairs.items():
        pattern = UNET_LORA_LAYER if part == "unet" else TEXT_ATTENTION
        if not pattern.fullmatch(module):
            skipped.append(f"{part}.{module}")
            continue
        if set(found) != {"lora_A", "lora_B"}:
            raise MixOfShowError(f"{path}: {part}.{module} lacks lora_A or lora_B")
        (key, down), (_, up) = found["lora_A"], found["lora_B"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise MixOfShowError(f"{path}: key {key!r} has shapes A {tuple(down.shape)}, B {tuple(up.shape)}: not "
                                 "a linear LoRA pair")
        rank = down.shape[0]
        if f"{part}.lora_alpha" in adapter:  # diffusers writes the LoraConfig fields, each prefixed by the part
            alpha = _pattern_value(adapter.get(f"{part}.alpha_pattern") or {}, module, adapter[f"{part}.lora_alpha"])
        else:
            alpha = rank  # diffusers' reading of a file without adapter metadata: scale 1
        loras[part][module] = (down, up, float(alpha) / rank, key)
    return loras, skipped


def _common_rank(loras: dict[str, dict]) -> tuple[dict[str, LoraWeights], int, float]:
    """One rank and alpha for every module, as a concept file has: kept when the file already has them; otherwise
    lower ranks are zero-padded to the highest and each module's alpha / rank is folded into B (exact)."""
    entries = [entry for weights in loras.values() for entry in weights.values()]
    ranks = {down.shape[0] for down, _, _, _ in entries}
    scales = {scale for _, _, scale, _ in entries}
    if len(ranks) == 1 and len(scales) == 1:
        rank, scale = ranks.pop(), scales.pop()
        return ({part: {m: (d.float(), u.float()) for m, (d, u, _, _) in weights.items()}
                 for part, weights in loras.items()}, rank, scale * rank)
    rank = max(ranks)
    out: dict[str, LoraWeights] = {}
    for part, weights in loras.items():
        out[part] = {}
        for module, (down, up, scale, _) in weights.items():
            padded_down = torch.zeros(rank, down.shape[1])
            padded_up = torch.zeros(up.shape[0], rank)
            padded_down[: down.shape[0]] = down.float()
            padded_up[:, : up.shape[1]] = up.float() * scale
            out[part][module] = (padded_down, padded_up)
    return out, rank, float(rank)


def _fingerprint(loras: dict[str, dict]) -> LoraFingerprint:
    """The sizes a LoRA file shows: the text encoder's width (its attention inputs) and the cross-attention
    dimension (the inputs of attn2's K/V), each with the first key that shows it. Every module's shapes are checked
    against the model when the concept loads (`check_lora_shapes`)."""
    sizes, evidence = {}, {}
    for down, _, _, key in loras["text_encoder"].values():
        sizes.setdefault("text_hidden_size", down.shape[1])
        evidence.setdefault("text_hidden_size", key)
    for module, (down, _, _, key) in loras["unet"].items():
        if module.endswith(("attn2.to_k", "attn2.to_v")):
            sizes.setdefault("cross_attention_dim", down.shape[1])
            evidence.setdefault("cross_attention_dim", key)
    return LoraFingerprint(evidence=evidence, **sizes)


def import_lora(path: str | Path, tensors: dict[str, torch.Tensor] | None = None,
                metadata: dict[str, str] | None = None) -> ConceptFile:
    """Read a kohya / A1111 or diffusers / PEFT LoRA file as a concept file with no words.

    Only the linears our LoRA lives on are read (UNet attn1/attn2 to_q/k/v/out and the transformer blocks'
    feed-forward ff.net.0.proj / ff.net.2, text encoder q/k/v/out_proj). LoRA on other layers (projections,
    convolutions, text-encoder MLPs: kohya's networks train some of them) is skipped with a warning that counts it:
    refusing would turn away most community LoRAs, and the attention and feed-forward layers carry most of a LoRA's
    effect; the skipped modules are listed in the concept's `config`.

    Args:
        path: the `.safetensors` LoRA file.
        tensors, metadata: the file's contents when already read.

    Returns:
        A `ConceptFile` without words (fuse it with trigger `prompts`); one rank and alpha for every module (see
        `_common_rank`); a base fingerprint holding only the sizes the tensors show.
    """
    path = Path(path)
    if tensors is None:
        tensors, metadata = read_safetensors(path)
    metadata = metadata or {}
    fmt = lora_format(tensors)
    if fmt is None:
        first = next(iter(tensors), "(no tensors)")
        raise MixOfShowError(
            f"{path} is not a mixofshow concept file (no 'mixofshow' metadata), nor a kohya / A1111 or diffusers "
            f"LoRA: its key {first!r} fits none of these layouts. Make a concept file with `mixofshow train` or "
            "import an official .pth"
        )
    _check_finite(path, tensors)
    loras, skipped = _read_kohya(path, tensors) if fmt == "kohya" else _read_diffusers(path, tensors, metadata)
    if not any(loras.values()):
        raise MixOfShowError(f"{path}: none of its {len(skipped)} LoRA modules is on a layer this model's LoRA can "
                             "use (UNet to_q/k/v/out and ff.net, text encoder q/k/v/out_proj)")
    if skipped:
        logger.warning("%s: skipped LoRA on %d layer(s) that are not attention or feed-forward linears (e.g. %s); "
                       "the other %d are read", path, len(skipped), skipped[0],
                       sum(len(w) for w in loras.values()))
    fingerprint = _fingerprint(loras)
    weights, rank, alpha = _common_rank(loras)
    return ConceptFile(
        words=(),
        embeddings={},
        text_encoder_lora=weights["text_encoder"],
        unet_lora=weights["unet"],
        rank=rank,
        alpha=alpha,
        base=fingerprint,
        mode="lora",
        config={"imported_from": str(path), "format": fmt, "skipped_modules": skipped},
    )


# -- single-file checkpoint -----------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_FIXED = {"conv_norm_out": "norm_out"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SD_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def _renamed_head(rest: str, table: dict[str, str]) -> str:
    """`rest` with its leading module name (one or two dotted parts) renamed by `table`."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x/2.x diffusers UNet state dict in the original (LDM) layout, without its prefix.

    The original UNet numbers its blocks flat: `input_blocks.0` is conv_in, then per down block one entry per
    resnet (+ attention) and one for the downsampler; `middle_block.0/1/2` = resnet, attention, resnet; then per up
    block `layers_per_block + 1` entries, the last also holding the upsampler (after the attention if there is one).
    """
    if not isinstance(config["layers_per_block"], int) or config.get("addition_embed_type") \
            or any(t not in SD_DOWN_BLOCKS for t in config["down_block_types"]) \
            or any(t not in SD_UP_BLOCKS for t in config["up_block_types"]):
        raise MixOfShowError("only Stable Diffusion 1.x/2.x UNets (plain down/up blocks, one layers_per_block, no "
                             "added conditioning) can be written as an original-layout checkpoint")
    per_block = config["layers_per_block"]
    blocks = len(config["down_block_types"])
    input_index, downsampler_index, index = {}, {}, 1
    for block in range(blocks):
        for layer in range(per_block):
            input_index[block, layer] = index
            index += 1
        if f"down_blocks.{block}.downsamplers.0.conv.weight" in state:
            downsampler_index[block] = index
            index += 1
    up_attention = {b: any(k.startswith(f"up_blocks.{b}.attentions.") for k in state) for b in range(blocks)}

    patterns: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
        (re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"input_blocks.{input_index[int(m[1]), int(m[2])]}.0.{_renamed_head(m[3], UNET_RESNET)}"),
        (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
         lambda m: f"input_blocks.{input_index[int(m[1]), int(m[2])]}.1.{m[3]}"),
        (re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
         lambda m: f"input_blocks.{downsampler_index[int(m[1])]}.0.op.{m[2]}"),
        (re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
         lambda m: f"middle_block.{2 * int(m[1])}.{_renamed_head(m[2], UNET_RESNET)}"),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
        (re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"output_blocks.{int(m[1]) * (per_block + 1) + int(m[2])}.0.{_renamed_head(m[3], UNET_RESNET)}"),
        (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
         lambda m: f"output_blocks.{int(m[1]) * (per_block + 1) + int(m[2])}.1.{m[3]}"),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
         lambda m: f"output_blocks.{int(m[1]) * (per_block + 1) + per_block}."
                   f"{2 if up_attention[int(m[1])] else 1}.conv.{m[2]}"),
        (re.compile(r"(time_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\.(weight|bias)"),
         lambda m: f"{UNET_FIXED[m[1]]}.{m[2]}"),
    ]
    return _rename_all(state, patterns, "UNet")


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL` state dict in the original layout, without its prefix: the decoder's up blocks in
    reverse order, mid resnets `block_1/2`, the mid attention's linears as 1x1 convolutions."""
    blocks = len(config["up_block_types"])
    patterns: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
        (re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_renamed_head(m[3], VAE_RESNET)}"),
        (re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.{_renamed_head(m[3], VAE_RESNET)}"),
        (re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
         lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"),
        (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"),
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_renamed_head(m[3], VAE_RESNET)}"),
        (re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)"),
         lambda m: f"{m[1]}.mid.attn_1.{_renamed_head(m[2], VAE_ATTENTION)}"),
        (re.compile(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)"),
         lambda m: f"{m[1]}.{VAE_FIXED.get(m[2], m[2])}.{m[3]}"),
        (re.compile(r"((?:post_)?quant_conv\..+)"), lambda m: m[1]),
    ]
    renamed = _rename_all(state, patterns, "VAE")
    for key, tensor in renamed.items():  # the original attention uses 1x1 convolutions: (out, in) -> (out, in, 1, 1)
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.dim() == 2:
            renamed[key] = tensor[:, :, None, None]
    return renamed


def _rename_all(state, patterns, what: str) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        for pattern, rename in patterns:
            match = pattern.fullmatch(key)
            if match:
                renamed[rename(match)] = tensor
                break
        else:
            raise MixOfShowError(f"{what} weight {key!r} has no place in an original-layout Stable Diffusion "
                                 "checkpoint: this model is not a Stable Diffusion 1.x/2.x model")
    return renamed


def text_encoder_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder state dict in the transformers-4 layout the original checkpoint nests (no prefix)."""
    return {key.removeprefix("text_model."): tensor for key, tensor in state.items()
            if not key.endswith("position_ids")}


def _folder_weights(folder: Path, part: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A component's weights as stored (all shards, their dtype) and its config, read from a pipeline folder."""
    files = sorted((folder / part).glob("*.safetensors"))
    if not files or not (folder / part / "config.json").is_file():
        raise MixOfShowError(f"{folder / part} holds no safetensors weights with a config.json: give a model folder "
                             "written by `mixofshow fuse` or diffusers' save_pretrained")
    state = {}
    for file in files:
        state.update(read_safetensors(file)[0])
    return state, json.loads((folder / part / "config.json").read_text())


def export_single_file(folder: str | Path, out: str | Path) -> ExportResult:
    """A model folder (a fused one, or any SD1.x/2.x diffusers folder) as one original-layout checkpoint
    (`StableDiffusionPipeline.from_single_file(out, config=folder)`), with its concept manifest beside it.

    The weights keep the folder's dtype; the file is written atomically. The concept tokens stay in the text
    encoder's token table (base vocabulary + concept tokens) and their names in `<name>.concepts.json`.

    Args:
        folder: a diffusers pipeline folder.
        out: the `.safetensors` file to write.

    Returns:
        The files written and notes for the user.
    """
    from .pipelines.pipeline_mixofshow import CONCEPTS_FILE

    folder, out = Path(folder), Path(out)
    if not (folder / "model_index.json").is_file():
        raise MixOfShowError(f"{folder} is not a diffusers model folder (no model_index.json): give a fused model "
                             "folder from `mixofshow fuse`")
    if out.suffix != ".safetensors":
        raise MixOfShowError(f"--out for single-file is a .safetensors file, got {out}")
    unet, unet_config = _folder_weights(folder, "unet")
    vae, vae_config = _folder_weights(folder, "vae")
    text_encoder, _ = _folder_weights(folder, "text_encoder")
    tensors = {}
    for prefix, state in ((UNET_PREFIX, unet_to_original(unet, unet_config)),
                          (VAE_PREFIX, vae_to_original(vae, vae_config)),
                          (TEXT_PREFIX, text_encoder_to_original(text_encoder))):
        tensors.update({prefix + key: tensor for key, tensor in state.items()})
    del unet, vae, text_encoder
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_config.read_text()) if scheduler_config.is_file() else {}
    manifest_path = folder / CONCEPTS_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    _, architecture = _architecture(unet_config.get("cross_attention_dim", 768))
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": IMPL_ORIGINAL_LAYOUT,
        "modelspec.title": out.stem,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": scheduler.get("prediction_type", "epsilon"),
        "mixofshow.source": str(folder),
    }
    if manifest is not None:
        metadata["mixofshow.concepts"] = json.dumps(manifest.get("tokens", {}))
    files = [_save(tensors, out, metadata)]
    notes = []
    if manifest is not None:
        copied = out.with_name(out.stem + MANIFEST_SUFFIX)
        write_atomically(copied, lambda tmp: shutil.copyfile(manifest_path, tmp))
        files.append(copied)
        added = len({name for names in manifest.get("tokens", {}).values() for name in names})
        notes.append(f"the text encoder's token table holds the base vocabulary plus {added} concept tokens: load it "
                     f"with StableDiffusionPipeline.from_single_file('{out}', config='{folder}') (the folder's "
                     "tokenizer knows them); tools that expect the plain CLIP vocabulary (A1111, ComfyUI) will refuse "
                     "the table")
    return ExportResult(tuple(files), tuple(notes))
