"""Typed, frozen configs and their YAML/JSON loading with errors that name the bad field."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import MixOfShowError
from .fusion.stats import SUBJECT_MAPS
from .lora import UNET_TARGET_PATTERNS


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """ED-LoRA (or plain LoRA) tuning of one concept; defaults are the official Mix-of-Show ones."""

    base: str = _help("base model: diffusers folder, single .safetensors/.ckpt file, or Hub id")
    data: str = _help("folder of images (png/jpg/jpeg/webp) with same-name .txt captions using <TOK>")
    out: str = _help("the concept file to write (.safetensors)")
    words: tuple[str, ...] = _help("concept words replacing <TOK>, e.g. ['<hina1>', '<hina2>']",
                                   default=("<concept1>", "<concept2>"))
    init: tuple[str, ...] = _help("one initialiser per word: '<rand-0.013>' or a one-token class word",
                                  default=("<rand-0.013>", "<rand-0.013>"))
    masks: str | None = _help("folder of subject masks (same base name, .png, white = subject)", default=None)
    mode: str = _help("'edlora' (layer-wise embeddings) or 'lora' (one embedding per word, the baseline)",
                      default="edlora")
    rank: int = _help("LoRA rank", default=4)
    alpha: float = _help("LoRA alpha, PEFT convention (scale = alpha / rank); 4 = the official alpha 1.0",
                         default=4.0)
    unet_lora_layers: str = _help("UNet layers with LoRA: 'attention' (self- and cross-attention, the official), "
                                  "'cross_attention' (its key, value and output only: less for fusion to reconcile) "
                                  "or 'attention_ff' (attention and the feed-forward layers: new details learned)",
                                  default="attention")
    steps: int = _help("optimizer steps", default=1000)
    batch_size: int = _help("images per step per process", default=2)
    gradient_accumulation: int = _help("micro-batches per optimizer step", default=1)
    resolution: int = _help("training image size in pixels", default=512)
    lr_embedding: float = _help("learning rate of the concept embeddings", default=1e-3)
    lr_text_encoder: float = _help("learning rate of the text-encoder LoRA", default=1e-5)
    lr_unet: float = _help("learning rate of the UNet LoRA", default=1e-4)
    weight_decay: float = _help("AdamW weight decay", default=0.01)
    lr_schedule: str = _help("diffusers schedule name (linear, constant, cosine, ...)", default="linear")
    warmup_steps: int = _help("learning-rate warm-up steps", default=0)
    noise_offset: float = _help("std of the per-channel noise offset", default=0.01)
    attn_reg_weight: float = _help("attention regularisation weight (needs masks; 0 = off)", default=0.01)
    attn_reg_full_identity: bool = _help("push the class word's map towards the mask (MSE) instead of only "
                                         "out of the background", default=False)
    embedding_norm_limit: float = _help("freeze the embeddings once their mean norm reaches this (0 = never)",
                                        default=0.55)
    embedding_only_steps: int = _help("first steps in which only the concept embeddings learn, the LoRAs waiting "
                                      "(pivotal tuning): the embeddings take what they can of the concept before "
                                      "the LoRAs share it (0 = all learn from the start, as officially)", default=0)
    regional_share: float = _help("share of steps in which the concept words condition only a box around the "
                                  "subject mask, the rest of the image reading the caption with the class word in "
                                  "their place (as regional sampling will use them: against a concept whose region "
                                  "stays empty; beyond the official recipe; needs masks)", default=0.0)
    require_placeholder: bool = _help("every caption must contain <TOK>", default=True)
    shuffle_caption: bool = _help("shuffle comma-separated caption parts after the first", default=True)
    caption_templates: tuple[str, ...] = _help("templates with {} for the concept, used for half the steps",
                                               default=())
    flip_p: float = _help("horizontal flip probability", default=0.5)
    zoom_out_p: float = _help("probability that a training crop is shrunk and put at a random place on a black "
                              "canvas whose border the loss ignores (the official ResizeFillMaskNew): the concept is "
                              "also learned small, as multi-concept layouts draw it", default=0.0)
    zoom_out_min: float = _help("smallest side of a zoomed-out crop, as a share of the resolution", default=0.5)
    mixed_precision: str = _help("'no', 'fp16' or 'bf16'", default="no")
    gradient_checkpointing: bool = _help("trade compute for memory", default=False)
    compile: bool = _help("torch.compile the UNet: faster steps on a GPU after a one-off compile", default=False)
    checkpoint_every: int = _help("save a resumable checkpoint every N steps (0 = never)", default=0)
    validation_prompt: str = _help("prompt for the validation grid (<TOK> = the concept)",
                                   default="a photo of <TOK>")
    validation_scales: tuple[float, ...] = _help("LoRA scales of the validation grid", default=(0.0, 0.7, 1.0))
    validation_steps: int = _help("sampling steps of the validation grid (0 = no grid)", default=25)
    seed: int = _help("random seed (data order, noise, augmentations, initialisers)", default=0)


def _check_value(name: str, hint, value, source: str):
    """Coerce `value` to the annotated type or raise naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, f"{source}: field '{name}'")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_value(name, next(a for a in args if a is not type(None)), value, source)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise MixOfShowError(f"{source}: field '{name}' must be a list, got {value!r}")
        return tuple(_check_value(name, args[0], v, source) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise MixOfShowError(f"{source}: field '{name}' must be true or false, got {value!r}")
        return value
    if hint in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and hint is int and float(value) != int(value):
            ok = False
        if not ok or not math.isfinite(value):
            raise MixOfShowError(f"{source}: field '{name}' must be a finite {hint.__name__}, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, (str, Path)):
            raise MixOfShowError(f"{source}: field '{name}' must be a string, got {value!r}")
        return str(value)
    return value


def config_from_dict(cls, data: dict, source: str = "config"):
    """Build a frozen config dataclass from a dict, checking every field's name and type.

    Args:
        cls: the dataclass type.
        data: field values.
        source: where the values came from, for error messages.

    Returns:
        An instance of `cls`.
    """
    if not isinstance(data, dict):
        raise MixOfShowError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MixOfShowError(f"{source}: unknown field(s) {unknown}; valid fields: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _check_value(name, hints[name], data[name], source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MixOfShowError(f"{source}: required field '{name}' is missing ({f.metadata.get('help', '')})")
    return cls(**values)


def read_document(path: str | Path, allow_list: bool = False) -> dict | list:
    """Read a YAML or JSON file into a dict (or a list), with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise MixOfShowError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise MixOfShowError(f"config file {path} could not be parsed: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
        raise MixOfShowError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def load_train_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """A `TrainConfig` from a YAML/JSON file (optional) with `overrides` (e.g. CLI flags) on top."""
    data = read_document(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = config_from_dict(TrainConfig, data, str(path) if path else "train options")
    validate_train_config(config)
    return config


def validate_train_config(config: TrainConfig) -> None:
    """Raise for values that type-check but make no sense."""
    if config.mode not in ("edlora", "lora"):
        raise MixOfShowError(f"field 'mode' must be 'edlora' or 'lora', got {config.mode!r}")
    if config.unet_lora_layers not in UNET_TARGET_PATTERNS:
        raise MixOfShowError(f"field 'unet_lora_layers' must be one of {', '.join(UNET_TARGET_PATTERNS)}, got "
                             f"{config.unet_lora_layers!r}")
    if len(config.init) != len(config.words):
        raise MixOfShowError(
            f"field 'init' has {len(config.init)} initialisers for {len(config.words)} words {list(config.words)}: "
            "give one per word, e.g. '<rand-0.013>+girl'"
        )
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise MixOfShowError(f"field 'mixed_precision' must be no, fp16 or bf16, got {config.mixed_precision!r}")
    for name in ("rank", "steps", "batch_size", "gradient_accumulation", "resolution"):
        if getattr(config, name) < 1:
            raise MixOfShowError(f"field '{name}' must be at least 1, got {getattr(config, name)}")
    for name in ("lr_embedding", "lr_text_encoder", "lr_unet", "weight_decay", "noise_offset", "attn_reg_weight",
                 "embedding_norm_limit", "embedding_only_steps", "checkpoint_every", "warmup_steps",
                 "validation_steps"):
        if getattr(config, name) < 0:
            raise MixOfShowError(f"field '{name}' must not be negative, got {getattr(config, name)}")
    if config.embedding_only_steps >= config.steps:
        raise MixOfShowError(f"field 'embedding_only_steps' ({config.embedding_only_steps}) must be below 'steps' "
                             f"({config.steps}), or the LoRAs never learn")
    if not 0 <= config.regional_share <= 1:
        raise MixOfShowError(f"field 'regional_share' must be within [0, 1], got {config.regional_share}")
    if not 0 <= config.flip_p <= 1:
        raise MixOfShowError(f"field 'flip_p' must be within [0, 1], got {config.flip_p}")
    if not 0 <= config.zoom_out_p <= 1:
        raise MixOfShowError(f"field 'zoom_out_p' must be within [0, 1], got {config.zoom_out_p}")
    if not 0 < config.zoom_out_min <= 1:
        raise MixOfShowError(f"field 'zoom_out_min' must be within (0, 1], got {config.zoom_out_min}")
    if not str(config.out).endswith(".safetensors"):
        raise MixOfShowError(f"field 'out' must name a .safetensors file, got {config.out!r}")


FUSION_METHODS = ("weight", "gradient", "zip", "lbfgs")


@dataclass(frozen=True)
class FusionConcept:
    """One input of a fusion: a concept file and how it enters the fused model."""

    path: str = _help("concept file: ours (.safetensors) or an official Mix-of-Show ED-LoRA (.pth)")
    unet_scale: float = _help("scale of the concept's UNet LoRA (official: unet_alpha)", default=1.0)
    text_encoder_scale: float = _help("scale of its text-encoder LoRA (official: text_encoder_alpha)", default=1.0)
    weight: float | None = _help("weight in `weight` fusion (default 1/n)", default=None)
    prompts: tuple[str, ...] = _help("prompts for its statistics instead of the templates (e.g. a trigger word "
                                     "for a LoRA without embeddings)", default=())
    stats: str | None = _help("statistics file from `mixofshow stats` (the center then skips its run)",
                              default=None)


@dataclass(frozen=True)
class FuseConfig:
    """Center-node fusion of any number of concept files into one model."""

    base: str = _help("base model: diffusers folder, single checkpoint file, or Hub id")
    out: str = _help("output folder (a diffusers pipeline plus concepts.json and fusion_report.json)")
    concepts: tuple[FusionConcept, ...] = _help("the concepts to fuse")
    method: str = _help("weight, gradient (closed form), zip (orthogonal column mergers) or lbfgs (reference)",
                        default="gradient")
    text_templates: tuple[str, ...] = _help("prompts for text-side statistics, {} = the concept words",
                                            default=("photo of a {}", "{}"))
    sampling_templates: tuple[str, ...] = _help("prompts of the sampling run for UNet statistics",
                                                default=("photo of a {}",))
    negative_prompt: str = _help("the negative prompt the sampler encodes (recorded too)", default="")
    sampling_steps: int = _help("steps of each concept's sampling run", default=20)
    sampling_guidance: float = _help("guidance of the sampling run", default=7.5)
    sampling_size: int | None = _help("image size of the sampling run (default: the model's)", default=None)
    sampling_seed: int = _help("seed of the sampling run", default=0)
    guided_weight: float = _help("weight of the guidance-combined rows u + s(c - u) in the statistics (0 = the "
                                 "paper's objective; see fusion.stats.Guidance)", default=100.0)
    background_weight: float = _help("weight of the UNet statistics rows where the concept's words are not attended "
                                     "in its sampling run, against 1 where they are most (a sampling run more per "
                                     "concept); 1 = every position alike, as in the paper", default=1.0)
    subject_map: str = _help("how the concept words' attention weights the rows when background_weight < 1: "
                             "'linear' (rising with the attention) or 'mask' (1 where it is high, split by Otsu's "
                             "threshold; background_weight elsewhere)", default="linear")
    prior_prompts: tuple[str, ...] = _help("generic prompts whose base-model behaviour fusion should keep",
                                           default=())
    prior_weight: float = _help("weight of that prior (0 = off, as in the paper)", default=0.0)
    rcond: float = _help("relative eigenvalue cutoff of the pseudo-inverse: eigen-directions of the Gram below "
                         "rcond * largest stay at weight fusion (float32 features say nothing there); with few "
                         "statistics prompts a larger cutoff over-fits them less (the toy world uses 1e-3)",
                         default=1e-6)
    zip_steps: int = _help("optimisation steps of `zip`", default=100)
    zip_lr: float = _help("learning rate of `zip`", default=0.01)
    zip_similarity_weight: float = _help("weight of the column-similarity penalty of `zip`", default=0.01)
    lbfgs_text_iterations: int = _help("L-BFGS iterations for text encoder and cross-attention K/V", default=500)
    lbfgs_unet_iterations: int = _help("L-BFGS iterations for the other UNet layers", default=50)
    overwrite: bool = _help("replace an existing output folder", default=False)


def official_fusion_list(entries: list, source: str) -> list[dict]:
    """The official fusion JSON (`[{lora_path, unet_alpha, text_encoder_alpha, concept_name}]`) as our entries."""
    concepts = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "lora_path" not in entry:
            raise MixOfShowError(f"{source}: entry {index} of the official fusion list has no 'lora_path'")
        concepts.append({"path": entry["lora_path"], "unet_scale": entry.get("unet_alpha", 1.0),
                         "text_encoder_scale": entry.get("text_encoder_alpha", 1.0)})
    return concepts


def load_fuse_config(path: str | Path | None = None, concepts: list | None = None, **overrides) -> FuseConfig:
    """A `FuseConfig` from a YAML/JSON file and/or overrides; `concepts` may be paths, dicts, or the official list.

    Args:
        path: a YAML/JSON file: our fields, or the official fusion list of concepts.
        concepts: concept paths or entries (added after those of the file).
        overrides: other fields (e.g. CLI flags); None values are ignored.

    Returns:
        The validated config.
    """
    source = str(path) if path else "fuse options"
    data: dict = {}
    if path:
        document = read_document(path, allow_list=True)
        data = {"concepts": official_fusion_list(document, source)} if isinstance(document, list) else document
    entries = list(data.get("concepts", ())) + list(concepts or ())
    data["concepts"] = [{"path": e} if isinstance(e, (str, Path)) else e for e in entries]
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = config_from_dict(FuseConfig, data, source)
    validate_fuse_config(config)
    return config


def validate_fuse_config(config: FuseConfig) -> None:
    """Raise for values that type-check but make no sense."""
    if not config.concepts:
        raise MixOfShowError("no concepts to fuse: give at least one concept file")
    if not 0 < config.background_weight <= 1:
        raise MixOfShowError(f"field 'background_weight' must be in (0, 1], got {config.background_weight}")
    if config.subject_map not in SUBJECT_MAPS:
        raise MixOfShowError(f"field 'subject_map' must be one of {', '.join(SUBJECT_MAPS)}, got "
                             f"{config.subject_map!r}")
    if config.method not in FUSION_METHODS:
        raise MixOfShowError(f"field 'method' must be one of {', '.join(FUSION_METHODS)}, got {config.method!r}")
    for template in config.text_templates + config.sampling_templates:
        if "{}" not in template:
            raise MixOfShowError(f"template {template!r} has no {{}} for the concept words")
    for index, concept in enumerate(config.concepts):
        if concept.weight is not None and concept.weight < 0:
            raise MixOfShowError(f"concept {index} ({concept.path}): weight must not be negative")
    for name in ("sampling_steps", "zip_steps"):
        if getattr(config, name) < 1:
            raise MixOfShowError(f"field '{name}' must be at least 1, got {getattr(config, name)}")
    if config.prior_weight < 0 or config.rcond < 0 or config.guided_weight < 0:
        raise MixOfShowError("fields 'prior_weight', 'rcond' and 'guided_weight' must not be negative")
    if config.prior_weight > 0 and not config.prior_prompts:
        raise MixOfShowError("field 'prior_weight' is set but 'prior_prompts' is empty: give generic prompts")
