"""Rendered toy-world training sets: many scenes as arrays (images, captions, per-object boxes and labels), rendered
in parallel; and object crops for the attribute classifier."""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .concepts import CONCEPTS, random_concept_scene
from .render import (
    ACCESSORIES,
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    SHAPES,
    Scene,
    caption,
    random_scene,
    render_with_masks,
)

logger = logging.getLogger(__name__)

# The classifier's heads and their class names, in label-column order (after the scene index column).
LABELS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "accessory": ACCESSORIES,
    "background": tuple(BACKGROUNDS),
    "concept": ("none",) + tuple(c.name for c in CONCEPTS),
}
_KINDS = {"base": 0, "concepts": 1}


@dataclass
class RenderedSet:
    """Rendered scenes.

    Args:
        images: (N, H, W, 3) uint8.
        captions: N captions (concept objects are described as ordinary objects of their class, colour, pattern).
        boxes: (M, 4) float32, one row per visible object: x0, y0, x1, y1 as fractions of the side.
        labels: (M, 1 + len(LABELS)) int64: the object's scene index, then one class index per head of `LABELS`
            ("concept" 0 = an ordinary object).
        object_captions: Per scene, each object's caption alone on the scene's background (a region prompt).
        object_columns: Per scene, each object's column.
    """

    images: np.ndarray
    captions: list[str]
    boxes: np.ndarray
    labels: np.ndarray
    object_captions: list[tuple[str, ...]]
    object_columns: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.captions)


def _scene(kind: str, seed: int, index: int):
    rng = np.random.default_rng([seed, index, _KINDS[kind]])
    if kind == "base":
        scene = random_scene(rng)
        return scene, (-1,) * len(scene.objects)
    return random_concept_scene(rng)


def _render_range(kind: str, seed: int, start: int, stop: int, size: int):
    images, captions, boxes, labels, object_captions, object_columns = [], [], [], [], [], []
    for index in range(start, stop):
        scene, picks = _scene(kind, seed, index)
        image, masks = render_with_masks(scene, size)
        images.append(np.asarray(image))
        captions.append(caption(scene))
        object_captions.append(tuple(caption(Scene(scene.background, (obj,))) for obj in scene.objects))
        object_columns.append(tuple(obj.column for obj in scene.objects))
        for obj, pick, mask in zip(scene.objects, picks, masks):
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            boxes.append((xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size))
            labels.append((index, SHAPES.index(obj.shape), LABELS["colour"].index(obj.colour),
                           PATTERNS.index(obj.pattern), ACCESSORIES.index(obj.accessory),
                           LABELS["background"].index(scene.background), pick + 1))
    return np.stack(images), captions, boxes, labels, object_captions, object_columns


def render_set(n: int, seed: int = 0, kind: str = "base", size: int = 64, workers: int = 0,
               chunk: int = 500) -> RenderedSet:
    """Render `n` random scenes; scene `i` depends only on (`seed`, `i`, `kind`), not on `workers`.

    Args:
        n: How many scenes.
        seed: Seeds the scenes.
        kind: "base" for the base world (`random_scene`, no concepts), "concepts" for scenes in which at least one
            object is a concept (`random_concept_scene`).
        size: Image side in pixels.
        workers: Processes to render with; 0 or 1 renders in this process.
        chunk: Scenes per task.

    Returns:
        A `RenderedSet`.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(_KINDS)}.")
    if n < 1:
        raise ValueError(f"n {n!r} must be at least 1.")
    ranges = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if workers > 1 and len(ranges) > 1:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = list(pool.map(_render_range, *zip(*[(kind, seed, a, b, size) for a, b in ranges])))
    else:
        parts = [_render_range(kind, seed, a, b, size) for a, b in ranges]
    images = np.concatenate([part[0] for part in parts])
    captions = [c for part in parts for c in part[1]]
    boxes = np.asarray([b for part in parts for b in part[2]], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray([label for part in parts for label in part[3]], dtype=np.int64).reshape(-1, 1 + len(LABELS))
    logger.info("Rendered %d %s scenes (%d objects)", n, kind, len(boxes))
    return RenderedSet(images, captions, boxes, labels, [c for part in parts for c in part[4]],
                       [c for part in parts for c in part[5]])


def images_to_tensor(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) uint8 tensor on `device`."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int, scale: torch.Tensor | float = 1.4,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """Square crops around boxes, resampled to `size` x `size` (bilinear, borders repeated).

    Args:
        images: (B, 3, H, W) float images, one per box.
        boxes: (B, 4) x0, y0, x1, y1 as fractions of the side.
        size: Output side in pixels.
        scale: Crop side as a multiple of the box's longer side (scalar or (B,)).
        shift: Optional (B, 2) shift of the crop centre, in crop sides.

    Returns:
        (B, 3, size, size) crops.
    """
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (B, 2) in [0, 1]
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * scale  # (B,)
    side = side.clamp(min=0.2, max=1.0)
    if shift is not None:
        centre = centre + shift * side[:, None]
    theta = torch.zeros(len(boxes), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, :, 2] = centre * 2 - 1
    grid = F.affine_grid(theta, [len(boxes), 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
