"""Layouts for regionally controllable sampling: regions (box or mask) with their prompts, and spatial conditions.

A layout is a YAML/JSON file (or a dict) checked completely by `load_layout` before any model loads:

    prompt: three people near the castle, best quality
    width: 768
    height: 512
    regions:
      - {prompt: "a <potter1> <potter2>, in uniform", box: [0.0, 0.0, 0.33, 1.0]}
      - {prompt: "a <hermione1> <hermione2>, girl", mask: masks/hermione.png, adapter_weight: 0.8}
    conditions:
      - {type: keypose, model: TencentARC/t2iadapter_openpose_sd14v1, image: pose.png}
    isolate_regions: true     # optional: regions kept apart in self-attention too (default false, as officially)

A region with a `detail_prompt` is finished by a detail pass after sampling (`pipelines.detail`): a square window
around it (`detail_window`, default the smallest square holding the region) redrawn zoomed in with that prompt alone
at `detail_strength`, against identity bleed between neighbours.

`layout_from_official` reads the official Mix-of-Show `prompt_rewrite` string (without `eval`), and
`draw_layout_preview` draws a layout so it can be checked before spending GPU time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .config import _help, read_document
from .errors import MixOfShowError

CONDITION_TYPES = ("keypose", "sketch", "openpose", "canny", "depth", "seg", "lineart", "scribble", "normal", "mlsd")
# The keys of `pipelines.SCHEDULERS`, repeated here so checking a layout does not import diffusers (a test compares).
SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "euler_a", "pndm")
MAX_SIZE = 16384  # largest width/height accepted, in pixels
MAX_SEED = 2**64 - 1  # torch generators take seeds in [0, 2**64)

LAYOUT_KEYS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "scheduler", "regions",
               "conditions", "isolate_regions", "detail_strength")
REGION_KEYS = ("prompt", "negative_prompt", "box", "mask", "adapter_weight", "detail_prompt", "detail_window")
CONDITION_KEYS = ("type", "model", "image", "weight")


@dataclass(frozen=True)
class Region:
    """One region of the image, a box or a mask, sampled with its own prompt."""

    prompt: str = _help("what the region shows, e.g. 'a <hina1> <hina2>, standing'")
    negative_prompt: str | None = _help("the region's negative prompt (None: the layout's)", default=None)
    box: tuple[int, int, int, int] | None = _help("[x0, y0, x1, y1] in pixels (exactly one of box/mask)",
                                                  default=None)
    mask: str | None = _help("path of a width x height grayscale image, white (> 127) = the region", default=None)
    adapter_weight: float = _help("weight of the spatial conditions inside this region", default=1.0)
    detail_prompt: str | None = _help("what the region shows close up: redrawn zoomed in with this prompt after "
                                      "sampling (None: no detail pass)", default=None)
    detail_window: tuple[int, int, int, int] | None = _help("[x0, y0, x1, y1] in pixels, square: the window the "
                                                            "detail pass redraws (None: the smallest square holding "
                                                            "the region)", default=None)

    def bounds(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The region's box, or its mask's bounding box, in pixels [x0, y0, x1, y1)."""
        if self.box is not None:
            return self.box
        ys, xs = np.nonzero(_read_mask(Path(self.mask), width, height, "mask"))
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class Condition:
    """A spatial condition (T2I-Adapter / ControlNet): its kind, model and image."""

    type: str = _help(f"kind of condition: one of {', '.join(CONDITION_TYPES)}")
    model: str = _help("the adapter model: local folder or Hub id")
    image: str = _help("path of the condition image (width x height)")
    weight: float = _help("strength of the condition", default=1.0)


@dataclass(frozen=True)
class Layout:
    """A multi-region image: a global prompt, regions with their prompts, spatial conditions and sampling settings.

    Build it with `load_layout`, which checks every field; a `Layout` built directly is trusted as is.
    """

    prompt: str = _help("the global prompt (the whole scene)")
    negative_prompt: str = _help("the global negative prompt, also used by regions without one", default="")
    width: int = _help("image width in pixels (a multiple of 8)", default=512)
    height: int = _help("image height in pixels (a multiple of 8)", default=512)
    steps: int = _help("sampling steps", default=30)
    guidance: float = _help("classifier-free guidance scale", default=7.5)
    seed: int | None = _help("random seed (None: random)", default=None)
    scheduler: str | None = _help(f"sampler: one of {', '.join(SCHEDULER_NAMES)} (None: the model's)", default=None)
    regions: tuple[Region, ...] = _help("the regions, in order", default=())
    conditions: tuple[Condition, ...] = _help("spatial conditions", default=())
    isolate_regions: bool = _help("keep the regions apart in self-attention too, against one subject's features "
                                  "bleeding into a neighbour's (not in the official method)", default=False)
    detail_strength: float = _help("how much of each detail window is redrawn (the share of the steps run again), "
                                   "for regions with a detail_prompt", default=0.85)

    def region_masks(self) -> torch.Tensor:
        """The regions as masks: 1 inside each region, 0 elsewhere.

        Returns:
            A float32 tensor of shape (R, height, width), one mask per region in order.
        """
        masks = torch.zeros(len(self.regions), self.height, self.width)  # (R, H, W)
        for index, region in enumerate(self.regions):
            if region.box is not None:
                x0, y0, x1, y1 = region.box
                masks[index, y0:y1, x0:x1] = 1.0
            else:
                inside = _read_mask(Path(region.mask), self.width, self.height, f"regions[{index}].mask")
                masks[index] = torch.from_numpy(inside)
        return masks

    def region_negative_prompts(self) -> list[str]:
        """Each region's negative prompt, the layout's where a region has none."""
        return [self.negative_prompt if r.negative_prompt is None else r.negative_prompt for r in self.regions]

    def to_dict(self) -> dict:
        """The layout as plain data (boxes in pixels, paths as stored); `load_layout` reads it back."""
        data = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "width": self.width,
                "height": self.height, "steps": self.steps, "guidance": self.guidance}
        if self.seed is not None:
            data["seed"] = self.seed
        if self.scheduler is not None:
            data["scheduler"] = self.scheduler
        regions = []
        for region in self.regions:
            entry = {"prompt": region.prompt}
            if region.negative_prompt is not None:
                entry["negative_prompt"] = region.negative_prompt
            if region.box is not None:
                entry["box"] = list(region.box)
            else:
                entry["mask"] = region.mask
            entry["adapter_weight"] = region.adapter_weight
            if region.detail_prompt is not None:
                entry["detail_prompt"] = region.detail_prompt
            if region.detail_window is not None:
                entry["detail_window"] = list(region.detail_window)
            regions.append(entry)
        data["regions"] = regions
        data["conditions"] = [{"type": c.type, "model": c.model, "image": c.image, "weight": c.weight}
                              for c in self.conditions]
        if self.isolate_regions:
            data["isolate_regions"] = True
        if any(region.detail_prompt is not None for region in self.regions):
            data["detail_strength"] = self.detail_strength
        return data

    def dumps(self, json_format: bool = False) -> str:
        """The layout file's text: YAML (or JSON), exactly what `save` writes and `load_layout` reads."""
        data = self.to_dict()
        if json_format:
            return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        """Write the layout atomically: JSON for a `.json` path, YAML otherwise.

        Args:
            path: the file to write; its folder is created.

        Returns:
            The path written.
        """
        path = Path(path)
        text = self.dumps(json_format=path.suffix == ".json")
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp", delete=False) as handle:
                temporary = Path(handle.name)
                handle.write(text)
            os.replace(temporary, path)
        except OSError as error:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            raise MixOfShowError(f"could not write the layout to {path}: {error}") from None
        return path


# ---------------------------------------------------------------------------------------------------------------
# Checking one value: each helper names the field path (e.g. `regions[1].box`) in its error.


def _show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _mapping(value, where: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict:
    name = where or "the layout"
    if not isinstance(value, dict):
        raise MixOfShowError(f"{name} must be a mapping of fields ({', '.join(allowed)}), got {_show(value)}")
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise MixOfShowError(f"{name} has unknown field(s) {', '.join(_show(k) for k in unknown)}; "
                             f"allowed fields: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise MixOfShowError(f"{_join(where, key)} is missing: give it (required fields of {name}: "
                                 f"{', '.join(required)})")
    return value


def _string(value, where: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise MixOfShowError(f"{where} must be a string, got {_show(value)}; quote it in YAML")
    if not allow_empty and not value.strip():
        raise MixOfShowError(f"{where} must not be empty: say what this part shows")
    return value


def _integer(value, where: str, minimum: int, maximum: int | None = None) -> int:
    if not _is_integer(value):
        raise MixOfShowError(f"{where} must be a whole number, got {_show(value)}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise MixOfShowError(f"{where} must be {bounds}, got {_show(value)}")
    return value


def _number(value, where: str) -> float:
    """A finite, non-negative number (weights, guidance)."""
    if not _is_number(value):
        raise MixOfShowError(f"{where} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise MixOfShowError(f"{where} must be a finite number >= 0, got {_show(value)}")
    return number


def _file(value, where: str, base: Path) -> Path:
    """An existing file, relative paths against `base`."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise MixOfShowError(f"{where} must be a file path, got {_show(value)}")
    path = _resolve(value, base)
    if not _is_file(path):
        raise MixOfShowError(f"{where}: file {str(path)!r} not found (from {_show(str(value))}); relative paths "
                             f"are read from {str(base)!r} (the layout file's folder, or base_dir)")
    return path


def _resolve(value: str | Path, base: Path) -> Path:
    path = Path(value)
    try:
        path = path.expanduser()
    except RuntimeError:  # '~name' of an unknown user: kept as written
        pass
    return path if path.is_absolute() else base / path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL byte
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


# What PIL raises for a missing, truncated or corrupt image file.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


def _open_image(path: Path, where: str) -> Image.Image:
    """Decode an image file completely, or raise naming the field."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except _DECODE_ERRORS as error:
        raise MixOfShowError(f"{where}: {str(path)!r} is not a readable image ({type(error).__name__}: {error}); "
                             "give a PNG or JPEG file") from None


def _check_size(image: Image.Image, path: Path, where: str, width: int, height: int) -> None:
    if image.size != (width, height):
        raise MixOfShowError(f"{where}: {str(path)!r} is {image.width} x {image.height} pixels but the layout is "
                             f"{width} x {height}; resize the image or change width/height")


def _read_mask(path: Path, width: int, height: int, where: str) -> np.ndarray:
    """A mask image as float32 (height, width): 1 where its grayscale value is above 127."""
    if not _is_file(path):
        raise MixOfShowError(f"{where}: mask file {str(path)!r} not found")
    image = _open_image(path, where)
    _check_size(image, path, where, width, height)
    inside = np.asarray(image.convert("L")) > 127  # (H, W)
    if not inside.any():
        raise MixOfShowError(f"{where}: mask {str(path)!r} is empty (no pixel above 127); paint the region white")
    return inside.astype(np.float32)


def _box(value, where: str, width: int, height: int, units: str = "auto") -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] as pixels: fractions when every value is <= 1 (with `units='auto'`), else pixels."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise MixOfShowError(f"{where} must be 4 numbers [x0, y0, x1, y1] (fractions of the image, all <= 1, or "
                             f"pixels), got {_show(value)}")
    try:
        values = [float(v) for v in value]
    except OverflowError:
        values = [math.inf]
    if not all(math.isfinite(v) for v in values):
        raise MixOfShowError(f"{where} must hold finite numbers, got {_show(value)}")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise MixOfShowError(f"{where} is inverted: {_show(value)} needs x1 > x0 and y1 > y0; the order is "
                             "[x0, y0, x1, y1] = [left, top, right, bottom]")
    fractions = units == "fractions" or (units == "auto" and max(values) <= 1)
    limit_x, limit_y = (1, 1) if fractions else (width, height)
    if x0 < 0 or y0 < 0 or x1 > limit_x or y1 > limit_y:
        kind = "as fractions, 0 to 1" if fractions else f"as pixels of a {width} x {height} image"
        raise MixOfShowError(f"{where} {_show(value)} lies outside the image ({kind}); keep 0 <= x0 < x1 <= {limit_x} "
                             f"and 0 <= y0 < y1 <= {limit_y}")
    scale_x, scale_y = (width, height) if fractions else (1, 1)
    pixels = (round(x0 * scale_x), round(y0 * scale_y), round(x1 * scale_x), round(y1 * scale_y))
    if pixels[2] <= pixels[0] or pixels[3] <= pixels[1]:
        raise MixOfShowError(f"{where} {_show(value)} covers no pixel once rounded ({list(pixels)} in a {width} x "
                             f"{height} image); make it larger")
    return pixels


# ---------------------------------------------------------------------------------------------------------------
# Checking a whole document.


def check_detail_window(window: tuple[int, int, int, int], region: tuple[int, int, int, int], where: str) -> None:
    """Raise unless a detail window (pixels) is square, within a pixel, and overlaps its region's box (pixels)."""
    x0, y0, x1, y1 = window
    if abs((x1 - x0) - (y1 - y0)) > 1:
        raise MixOfShowError(f"{where} {list(window)} is {x1 - x0} x {y1 - y0} pixels: make it square (it is scaled "
                             "to the model's square size)")
    rx0, ry0, rx1, ry1 = region
    if rx0 >= x1 or rx1 <= x0 or ry0 >= y1 or ry1 <= y0:
        raise MixOfShowError(f"{where} {list(window)} does not overlap the region ({list(region)})")


def _region(value, where: str, width: int, height: int, base: Path, units: str) -> Region:
    data = _mapping(value, where, REGION_KEYS, required=("prompt",))
    prompt = _string(data["prompt"], _join(where, "prompt"), allow_empty=False)
    negative = data.get("negative_prompt")
    negative = None if negative is None else _string(negative, _join(where, "negative_prompt"))
    has_box, has_mask = data.get("box") is not None, data.get("mask") is not None
    if has_box == has_mask:
        found = "both" if has_box else "neither"
        raise MixOfShowError(f"{where} needs exactly one of 'box' ([x0, y0, x1, y1]) or 'mask' (an image path), "
                             f"got {found}")
    box = mask = None
    if has_box:
        box = _box(data["box"], _join(where, "box"), width, height, units)
    else:
        path = _file(data["mask"], _join(where, "mask"), base)
        _read_mask(path, width, height, _join(where, "mask"))
        mask = str(path)
    weight = _number(data.get("adapter_weight", 1.0), _join(where, "adapter_weight"))
    region = Region(prompt=prompt, negative_prompt=negative, box=box, mask=mask, adapter_weight=weight)
    detail = data.get("detail_prompt")
    if detail is None:
        if data.get("detail_window") is not None:
            raise MixOfShowError(f"{_join(where, 'detail_window')} needs a detail_prompt (what the window shows)")
        return region
    detail = _string(detail, _join(where, "detail_prompt"), allow_empty=False)
    window = None
    if data.get("detail_window") is not None:
        where_window = _join(where, "detail_window")
        window = _box(data["detail_window"], where_window, width, height, units)
        check_detail_window(window, region.bounds(width, height), where_window)
    return dataclasses.replace(region, detail_prompt=detail, detail_window=window)


def _condition(value, where: str, width: int, height: int, base: Path) -> Condition:
    data = _mapping(value, where, CONDITION_KEYS, required=("type", "model", "image"))
    kind = _string(data["type"], _join(where, "type"))
    if kind not in CONDITION_TYPES:
        raise MixOfShowError(f"{_join(where, 'type')} {kind!r} is not a known condition type; known types: "
                             f"{', '.join(CONDITION_TYPES)}")
    model = data["model"]
    if isinstance(model, Path):
        model = str(model)
    model = _string(model, _join(where, "model"), allow_empty=False)
    local = _resolve(model, base)
    if _exists(local):  # a local folder or file; otherwise a Hub id, kept as written
        model = str(local)
    path = _file(data["image"], _join(where, "image"), base)
    _check_size(_open_image(path, _join(where, "image")), path, _join(where, "image"), width, height)
    weight = _number(data.get("weight", 1.0), _join(where, "weight"))
    return Condition(type=kind, model=model, image=str(path), weight=weight)


def _size(data: dict, key: str, default: int) -> int:
    value = _integer(data.get(key, default), key, minimum=8, maximum=MAX_SIZE)
    if value % 8:
        raise MixOfShowError(f"{key} must be a multiple of 8 (the VAE's downsampling), got {value}; e.g. "
                             f"{max(8, value - value % 8)}")
    return value


def _entries(data: dict, key: str) -> list:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise MixOfShowError(f"{key} must be a list (one '- ...' entry per item), got {_show(value)}")
    return value


def _layout_from_document(data, base: Path, units: str = "auto") -> Layout:
    data = _mapping(data, "", LAYOUT_KEYS, required=("prompt",))
    prompt = _string(data["prompt"], "prompt")
    negative = _string(data.get("negative_prompt", ""), "negative_prompt")
    width, height = _size(data, "width", 512), _size(data, "height", 512)
    steps = _integer(data.get("steps", 30), "steps", minimum=1)
    guidance = _number(data.get("guidance", 7.5), "guidance")
    seed = data.get("seed")
    seed = None if seed is None else _integer(seed, "seed", minimum=0, maximum=MAX_SEED)
    scheduler = data.get("scheduler")
    if scheduler is not None:
        scheduler = _string(scheduler, "scheduler")
        if scheduler not in SCHEDULER_NAMES:
            raise MixOfShowError(f"scheduler {scheduler!r} is unknown; choose one of {', '.join(SCHEDULER_NAMES)}")
    regions = tuple(_region(entry, f"regions[{i}]", width, height, base, units)
                    for i, entry in enumerate(_entries(data, "regions")))
    conditions = tuple(_condition(entry, f"conditions[{i}]", width, height, base)
                       for i, entry in enumerate(_entries(data, "conditions")))
    isolate = data.get("isolate_regions", False)
    if not isinstance(isolate, bool):
        raise MixOfShowError(f"isolate_regions must be true or false, got {_show(isolate)}")
    strength = _number(data.get("detail_strength", Layout.detail_strength), "detail_strength")
    if not 0 < strength <= 1:
        raise MixOfShowError(f"detail_strength must be in (0, 1] (the share of the steps run again), got {strength}")
    return Layout(prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps,
                  guidance=guidance, seed=seed, scheduler=scheduler, regions=regions, conditions=conditions,
                  isolate_regions=isolate, detail_strength=strength)


def load_layout(source: str | Path | dict, base_dir: str | Path | None = None) -> Layout:
    """Read and check a layout: every field, box, mask and condition image, before any model loads.

    Args:
        source: a YAML/JSON file, or the layout as a dict.
        base_dir: folder that relative paths (masks, condition images, local adapter models) are read from
            (default: the layout file's folder, or the working directory for a dict).

    Returns:
        The checked `Layout`: boxes in pixels, paths made absolute.

    Raises:
        MixOfShowError: naming the file, the field path (e.g. `regions[1].box`), the bad value and what to do.
    """
    if isinstance(source, (str, Path)):
        if not _is_file(Path(source)):
            raise MixOfShowError(f"layout file {str(source)!r} not found")
        name, data = str(source), read_document(source)
        base = Path(base_dir) if base_dir is not None else Path(source).parent
    else:  # the document itself; anything but a dict is refused below
        name, data = "layout", source
        base = Path(base_dir) if base_dir is not None else Path.cwd()
    try:
        return _layout_from_document(data, base.absolute())
    except MixOfShowError as error:
        raise MixOfShowError(f"{name}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# The official Mix-of-Show format.

OFFICIAL_SEPARATOR = "-*-"
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _unbracket(text: str) -> str:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    return text


def _official_box(text: str, where: str) -> list[float]:
    """The numbers of '[y0, x0, y1, x1]' (brackets optional; '[]' = the whole image), parsed without eval."""
    inner = _unbracket(text)
    if not inner:
        return []
    parts = [part.strip() for part in inner.split(",")]
    if len(parts) != 4 or not all(_NUMBER.fullmatch(part) for part in parts):
        raise MixOfShowError(f"{where} must be 4 numbers [y0, x0, y1, x1] in pixels (official order: top, left, "
                             f"bottom, right), got {_show(text.strip())}")
    values = [float(part) for part in parts]
    return [int(v) if v.is_integer() else v for v in values]


def layout_from_official(rewrite: str, width: int, height: int, prompt: str = "", negative_prompt: str = "") -> Layout:
    """A layout from the official Mix-of-Show `prompt_rewrite` string.

    The official form is `[region prompt]-*-[region negative prompt]-*-[y0, x0, y1, x1]|...`: regions separated by
    `|`, boxes in pixels with y first (an empty box `[]` covers the whole image). It is parsed as text, never
    evaluated, then checked like `load_layout`.

    Args:
        rewrite: the official `prompt_rewrite` string.
        width: image width in pixels.
        height: image height in pixels.
        prompt: the global (context) prompt.
        negative_prompt: the global negative prompt.

    Returns:
        The checked `Layout` with boxes converted to [x0, y0, x1, y1].
    """
    name = "official prompt_rewrite"
    if not isinstance(rewrite, str):
        raise MixOfShowError(f"{name}: must be a string, got {_show(rewrite)}")
    pieces = rewrite.split("|")
    while pieces and not pieces[-1].strip():  # a trailing '|', as the official scripts allow
        pieces.pop()
    if not pieces:
        raise MixOfShowError(f"{name}: no region given; the form is [prompt]-*-[negative prompt]-*-[y0, x0, y1, x1]")
    regions, given = [], []
    for index, piece in enumerate(pieces):
        where = f"regions[{index}]"
        parts = piece.split(OFFICIAL_SEPARATOR)
        if len(parts) != 3:
            raise MixOfShowError(f"{name}: {where} {_show(piece.strip())} has {len(parts)} part(s) separated by "
                                 f"'{OFFICIAL_SEPARATOR}', expected 3: "
                                 "[prompt]-*-[negative prompt]-*-[y0, x0, y1, x1]")
        corners = _official_box(parts[2], f"{name}: {where}.box")
        if corners:
            y0, x0, y1, x1 = corners
            box = [x0, y0, x1, y1]
        else:
            box = [0, 0, width, height]
        regions.append({"prompt": _unbracket(parts[0]), "negative_prompt": _unbracket(parts[1]), "box": box})
        given.append(parts[2].strip())
    document = {"prompt": prompt, "negative_prompt": negative_prompt, "width": width, "height": height,
                "regions": regions}
    try:
        return _layout_from_document(document, Path.cwd(), units="pixels")
    except MixOfShowError as error:
        message = f"{name}: {error}"
        box = re.search(r"regions\[(\d+)\]\.box", message)
        if box:  # the user wrote y first: show what they wrote next to the converted box
            message += f" (converted from the official [y0, x0, y1, x1] = {given[int(box.group(1))]})"
        raise MixOfShowError(message) from None


# ---------------------------------------------------------------------------------------------------------------
# Preview.

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))
TINT_ALPHA = 56  # opacity of a region's fill over the background
MAX_LABEL = 60  # characters of a prompt written on the preview


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[int, int], room: int, colour, font) -> None:
    """Write `text` (shortened to fit `room` pixels) on a filled strip at `corner`."""
    text = " ".join(text.split())
    if len(text) > MAX_LABEL:
        text = text[: MAX_LABEL - 3] + "..."
    while len(text) > 4 and draw.textlength(text, font=font) > room:
        text = text[:-4] + "..."
    left, top = corner
    x0, y0, x1, y1 = draw.textbbox((left, top), text, font=font)
    draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=colour)
    draw.text((left, top), text, fill=(255, 255, 255, 255), font=font)


def draw_layout_preview(layout: Layout, background: Image.Image | None = None) -> Image.Image:
    """Draw the regions of a layout, each in its own colour with its prompt, to check it before sampling.

    Args:
        layout: the layout.
        background: the image to draw on (default: the first condition image, or a grey canvas); it is resized
            to the layout's size.

    Returns:
        An RGB image of the layout's size.
    """
    size = (layout.width, layout.height)
    if background is None and layout.conditions:
        background = _open_image(Path(layout.conditions[0].image), "conditions[0].image")
    if background is None:
        canvas = Image.new("RGBA", size, (128, 128, 128, 255))
    else:
        canvas = background.convert("RGBA").resize(size)
    line = max(2, min(size) // 128)
    font = _font(max(10, min(size) // 32))
    masks = layout.region_masks()  # (R, H, W)
    for index, (region, mask) in enumerate(zip(layout.regions, masks)):
        colour = PALETTE[index % len(PALETTE)]
        overlay = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        if region.box is not None:
            x0, y0, x1, y1 = region.box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour + (TINT_ALPHA,), outline=colour + (255,),
                           width=line)
            corner, room = (x0 + line + 2, y0 + line + 2), x1 - x0 - 2 * line - 4
        else:
            inside = Image.fromarray((mask.numpy() * 255).astype(np.uint8))  # (H, W), 255 = the region
            overlay.paste(colour + (TINT_ALPHA,), mask=inside)
            edge = inside.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(2 * (line // 2) + 1))
            overlay.paste(colour + (255,), mask=edge)
            x0, y0, x1, _ = inside.getbbox()
            corner, room = (x0 + line + 2, y0 + line + 2), x1 - x0 - 2 * line - 4
        _label(draw, f"{index}: {region.prompt}", corner, max(room, 1), colour + (255,), font)
        canvas = Image.alpha_composite(canvas, overlay)
    if layout.prompt:
        overlay = Image.new("RGBA", size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        bottom = layout.height - draw.textbbox((0, 0), "Ag", font=font)[3] - line - 2
        _label(draw, f"global: {layout.prompt}", (line + 2, bottom), layout.width - 2 * line - 4,
               (40, 40, 40, 220), font)
        canvas = Image.alpha_composite(canvas, overlay)
    return canvas.convert("RGB")
