"""Single-concept training data for ED-LoRA tuning: scanning and validating a concept folder, and sampling crops."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mixofshow.errors import MixOfShowError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # matched case-insensitively
CONCEPT_PLACEHOLDER = "<TOK>"
MASK_SUFFIX = ".png"
MASK_THRESHOLD = 128  # mask pixels >= this count as subject
_MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class ConceptExample:
    """One training image of the concept.

    Args:
        image_path: The image file.
        caption: The raw caption, still containing `CONCEPT_PLACEHOLDER`.
        mask_path: The subject mask (white = subject), or None for "whole image".
    """

    image_path: Path
    caption: str
    mask_path: Path | None


def _decode(path: Path, mode: str, what: str) -> Image.Image:
    """Open, fully decode and convert one image file, turning any decoder failure into a MixOfShowError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except Exception as err:  # PIL decoders raise many types (OSError, SyntaxError, ValueError, EOFError, ...)
        raise MixOfShowError(
            f"{path}: the {what} cannot be decoded ({type(err).__name__}: {err}); "
            f"replace it with a valid image file or remove it."
        ) from err


def _read_caption(caption_path: Path, default_caption: str) -> str:
    """The stripped caption from `caption_path`, or `default_caption` when the file is missing or empty."""
    if not caption_path.is_file():
        return default_caption
    try:
        text = caption_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise MixOfShowError(
            f"{caption_path}: the caption file cannot be read as UTF-8 text ({err}); re-save it as UTF-8 text."
        ) from err
    return text or default_caption


def scan_concept_folder(
    data_dir: str | Path,
    mask_dir: str | Path | None = None,
    *,
    require_placeholder: bool = True,
    default_caption: str = f"a photo of {CONCEPT_PLACEHOLDER}",
) -> list[ConceptExample]:
    """Find and validate every training image of one concept.

    Images are the files in `data_dir` whose suffix is one of `IMAGE_SUFFIXES` (any case); hidden files, subfolders
    and other files are ignored. Each image's caption is the same-name `.txt` file next to it (whitespace stripped);
    a missing or empty caption file means `default_caption`. Every image and mask is fully decoded here so that bad
    files fail before training starts; all per-file problems are reported together.

    Args:
        data_dir: Folder with the concept's images and optional `.txt` captions.
        mask_dir: Optional folder with one mask per image, named `<image stem>.png`, white = subject. When given,
            every image must have a mask of the same size.
        require_placeholder: Require every caption to contain `CONCEPT_PLACEHOLDER`.
        default_caption: Caption for images without a (non-empty) caption file.

    Returns:
        The examples, sorted by image file name.

    Raises:
        MixOfShowError: A folder is missing, no images are found, or any image, mask or caption is invalid.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise MixOfShowError(f"{data_dir}: the concept data folder {what}; pass the folder holding the images.")
    if mask_dir is not None:
        mask_dir = Path(mask_dir)
        if not mask_dir.is_dir():
            what = "is not a directory" if mask_dir.exists() else "does not exist"
            raise MixOfShowError(
                f"{mask_dir}: the mask folder {what}; pass the folder holding the masks, or no mask folder at all."
            )
    if require_placeholder and CONCEPT_PLACEHOLDER not in default_caption:
        raise MixOfShowError(
            f"default_caption {default_caption!r} does not contain {CONCEPT_PLACEHOLDER}; "
            f"add {CONCEPT_PLACEHOLDER} where the concept should appear."
        )

    image_paths = sorted(
        (
            p
            for p in data_dir.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda p: p.name,
    )
    if not image_paths:
        raise MixOfShowError(
            f"{data_dir}: no images found; the folder needs image files with one of the suffixes "
            f"{', '.join(IMAGE_SUFFIXES)} (any case)."
        )

    problems: list[str] = []
    examples: list[ConceptExample] = []
    for image_path in image_paths:
        try:
            caption_path = image_path.with_suffix(".txt")
            caption = _read_caption(caption_path, default_caption)
            if require_placeholder and CONCEPT_PLACEHOLDER not in caption:
                raise MixOfShowError(
                    f"{caption_path}: the caption {caption!r} does not contain {CONCEPT_PLACEHOLDER}; "
                    f"add {CONCEPT_PLACEHOLDER} where the concept should appear."
                )
            image_size = _decode(image_path, "RGB", "image").size
            mask_path = None
            if mask_dir is not None:
                mask_path = mask_dir / (image_path.stem + MASK_SUFFIX)
                if not mask_path.is_file():
                    raise MixOfShowError(
                        f"{image_path}: the image has no mask; expected {mask_path}. Add the mask (white = subject) "
                        f"or train without a mask folder."
                    )
                mask_size = _decode(mask_path, "L", "mask").size
                if mask_size != image_size:
                    raise MixOfShowError(
                        f"{mask_path}: the mask is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]} (width x height); resize the mask to match the image."
                    )
        except MixOfShowError as err:
            problems.append(str(err))
            continue
        examples.append(ConceptExample(image_path=image_path, caption=caption, mask_path=mask_path))

    if problems:
        listed = "\n".join(f"- {p}" for p in problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        tail = f"\n- ... and {more} more" if more > 0 else ""
        raise MixOfShowError(f"{data_dir}: {len(problems)} invalid training example(s):\n{listed}{tail}")
    logger.info("Found %d training images in %s", len(examples), data_dir)
    return examples


def _resize_short_side(im: Image.Image, resolution: int, resample: Image.Resampling) -> Image.Image:
    """Resize `im` so its shorter side equals `resolution`, keeping the aspect ratio."""
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return im if size == im.size else im.resize(size, resample=resample)


class ConceptDataset:
    """In-memory training images of one concept, sampled deterministically from a `torch.Generator`.

    Images and masks are decoded and resized (shorter side = `resolution`) once here; `sample` only crops, flips
    and builds the caption.

    Args:
        examples: The examples from `scan_concept_folder`.
        resolution: Side of the square training crops, in pixels.
        concept_text: What replaces `CONCEPT_PLACEHOLDER` in captions, e.g. "<hina1> <hina2>".
        flip_p: Probability of a horizontal flip.
        zoom_out_p: Probability that a crop is shrunk to a random side in [`zoom_out_min`, 1] x `resolution` and
            put at a random place on a black canvas; the mask is 0 outside it, so the (masked) loss ignores the
            canvas. The caption is kept. The official ResizeFillMaskNew.
        zoom_out_min: Smallest side of a zoomed-out crop, as a share of `resolution`.
        shuffle_caption: Shuffle the comma-separated caption parts after the first `keep_tokens`.
        keep_tokens: How many leading caption parts stay in place when shuffling.
        caption_templates: If non-empty, each sample uses, with probability 0.5, a random template instead of its
            caption; "{}" in a template stands for `concept_text`.
    """

    def __init__(
        self,
        examples: list[ConceptExample],
        resolution: int,
        concept_text: str,
        *,
        flip_p: float = 0.5,
        zoom_out_p: float = 0.0,
        zoom_out_min: float = 0.5,
        shuffle_caption: bool = False,
        keep_tokens: int = 1,
        caption_templates: tuple[str, ...] = (),
    ) -> None:
        if not examples:
            raise MixOfShowError("ConceptDataset got no examples; scan a concept folder with at least one image.")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            raise MixOfShowError(f"resolution must be a positive integer, got {resolution!r}.")
        if not isinstance(concept_text, str) or not concept_text.strip():
            raise MixOfShowError(f"concept_text must be a non-empty string, got {concept_text!r}.")
        if not 0.0 <= flip_p <= 1.0:
            raise MixOfShowError(f"flip_p must be in [0, 1], got {flip_p!r}.")
        if not 0.0 <= zoom_out_p <= 1.0:
            raise MixOfShowError(f"zoom_out_p must be in [0, 1], got {zoom_out_p!r}.")
        if not 0.0 < zoom_out_min <= 1.0:
            raise MixOfShowError(f"zoom_out_min must be in (0, 1], got {zoom_out_min!r}.")
        if keep_tokens < 0:
            raise MixOfShowError(f"keep_tokens must be >= 0, got {keep_tokens!r}.")
        for template in caption_templates:
            if "{}" not in template:
                raise MixOfShowError(f"caption template {template!r} has no '{{}}' for the concept text; add one.")

        self.examples = list(examples)
        self.resolution = resolution
        self.concept_text = concept_text
        self.flip_p = float(flip_p)
        self.zoom_out_p = float(zoom_out_p)
        self.zoom_out_min = float(zoom_out_min)
        self.shuffle_caption = shuffle_caption
        self.keep_tokens = keep_tokens
        self.caption_templates = tuple(caption_templates)

        # uint8 tensors, already resized: images (3, H, W) in 0..255, masks (1, H, W) in {0, 1}.
        self._images: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        for ex in self.examples:
            raw_image = _decode(ex.image_path, "RGB", "image")
            image = _resize_short_side(raw_image, resolution, Image.Resampling.BICUBIC)
            self._images.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
            if ex.mask_path is None:
                mask = torch.ones((1, image.height, image.width), dtype=torch.uint8)
            else:
                raw = _decode(ex.mask_path, "L", "mask")
                if raw.size != raw_image.size:  # examples may not come from scan_concept_folder
                    raise MixOfShowError(
                        f"{ex.mask_path}: the mask is {raw.size[0]}x{raw.size[1]} but its image {ex.image_path} is "
                        f"{raw_image.width}x{raw_image.height} (width x height); resize the mask to match the image."
                    )
                binary = raw.point(lambda v: 1 if v >= MASK_THRESHOLD else 0)
                binary = _resize_short_side(binary, resolution, Image.Resampling.NEAREST)
                mask = torch.from_numpy(np.asarray(binary, dtype=np.uint8).copy()).unsqueeze(0)
            self._masks.append(mask)
        logger.info("Loaded %d concept images at resolution %d", len(self.examples), resolution)

    def __len__(self) -> int:
        return len(self.examples)

    def _caption(self, index: int, generator: torch.Generator) -> str:
        """The caption for one sample, with the placeholder replaced by the concept text."""
        if self.caption_templates and torch.rand(1, generator=generator).item() < 0.5:
            pick = int(torch.randint(len(self.caption_templates), (1,), generator=generator).item())
            return self.caption_templates[pick].replace("{}", self.concept_text)
        caption = self.examples[index].caption
        if self.shuffle_caption:
            parts = [p.strip() for p in caption.split(",") if p.strip()]
            head, rest = parts[: self.keep_tokens], parts[self.keep_tokens :]
            order = torch.randperm(len(rest), generator=generator).tolist()
            caption = ", ".join(head + [rest[i] for i in order])
        return caption.replace(CONCEPT_PLACEHOLDER, self.concept_text)

    def sample(self, index: int, generator: torch.Generator) -> dict:
        """One training sample: a random square crop, maybe flipped, maybe zoomed out, and its caption.

        Args:
            index: Which example, 0 <= index < len(self).
            generator: The only source of randomness; the same generator state gives the same sample.

        Returns:
            A dict with "pixel_values" (float32, (3, R, R), in [-1, 1]), "mask" (float32, (1, R, R), 0 or 1, 1 =
            subject; without a mask file, 1 = the image, 0 = a zoomed-out crop's canvas) and "caption" (str).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} examples.")
        image, mask = self._images[index], self._masks[index]
        r = self.resolution
        _, h, w = image.shape
        top = int(torch.randint(h - r + 1, (1,), generator=generator).item())
        left = int(torch.randint(w - r + 1, (1,), generator=generator).item())
        flip = torch.rand(1, generator=generator).item() < self.flip_p
        image = image[:, top : top + r, left : left + r]
        mask = mask[:, top : top + r, left : left + r]
        if flip:
            image, mask = image.flip(-1), mask.flip(-1)
        pixels, mask = image.to(torch.float32) / 127.5 - 1.0, mask.to(torch.float32)
        # Drawn only when zooming out is on, so that the samples without it stay the same
        if self.zoom_out_p and torch.rand(1, generator=generator).item() < self.zoom_out_p:
            pixels, mask = self._zoomed_out(pixels, mask, generator)
        return {"pixel_values": pixels, "mask": mask, "caption": self._caption(index, generator)}

    def _zoomed_out(self, pixels: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A crop shrunk to a random side and put at a random place on a black canvas (its mask 0 on the canvas)."""
        r = self.resolution
        share = self.zoom_out_min + (1.0 - self.zoom_out_min) * torch.rand(1, generator=generator).item()
        side = max(1, round(r * share))
        top = int(torch.randint(r - side + 1, (1,), generator=generator).item())
        left = int(torch.randint(r - side + 1, (1,), generator=generator).item())
        canvas, placed = torch.full_like(pixels, -1.0), torch.zeros_like(mask)
        canvas[:, top:top + side, left:left + side] = F.interpolate(pixels[None], size=(side, side), mode="area")[0]
        placed[:, top:top + side, left:left + side] = F.interpolate(mask[None], size=(side, side), mode="nearest")[0]
        return canvas, placed

    def batch(self, indices: list[int], generator: torch.Generator) -> dict:
        """Samples for `indices`, drawn in order from `generator`, stacked into a batch.

        Args:
            indices: Example indices, one per batch row.
            generator: The only source of randomness.

        Returns:
            A dict with "pixel_values" (float32, (B, 3, R, R)), "mask" (float32, (B, 1, R, R)) and "captions"
            (list[str]).
        """
        if not indices:
            raise MixOfShowError("batch got no indices; pass at least one example index.")
        samples = [self.sample(i, generator) for i in indices]
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "mask": torch.stack([s["mask"] for s in samples]),
            "captions": [s["caption"] for s in samples],
        }
