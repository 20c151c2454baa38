"""Scoring toy-world images with the attribute classifier: identity, prompt fidelity and regional binding.

A `Target` is what a prompt asks for: the `Scene` a perfect model would draw and, per object, the concept it is (or
None). Scoring finds each object in its region of the image (the largest blob of pixels unlike the background),
classifies a crop around it, and compares with the target:

- identity: the classifier's concept head names the target's concept ("none" for an ordinary object); the analogue
  of the paper's CLIP image alignment;
- prompt fidelity: shape, colour, pattern, accessory, background, and position (the nearest of the nine positions
  the renderer draws); the analogue of CLIP text alignment;
- regional binding: in a multi-region image, each region's object is that region's concept (identity, per box);
- strict identity (`identity_strict`): identity with the right shape and colour too. The concept head was trained
  only on concepts in their own colours, so it may name a wrongly coloured look-alike (a pink square with moss's
  cross) the concept; strict identity does not.

Identity is also scored softly, as `identity_p`: the classifier's probability of the target's concept, a continuous
score like the paper's CLIP similarity (with the shipped classifier it stays close to the right/wrong share).

    targets = concept_targets(get_concept("pip"), n=4)
    images = [pipe(t.prompt(), ...).images[0] for t in targets]
    summarize(score_images(classifier, images, targets))   # {"found": 1.0, "identity": 0.94, "shape": 1.0, ...}
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .concepts import Concept, get_concept
from .render import BACKGROUNDS, COLUMNS, ROWS, Scene, ToyObject, caption, contrast, random_scene, render_with_masks

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image side

HEADS = ("shape", "colour", "pattern", "accessory", "background")  # classifier heads compared with the target
METRICS = ("found", "identity") + HEADS + ("position", "identity_strict")
SOFT_METRICS = ("identity_p",)  # read from `ObjectScore.soft`; NaN for a classifier without `probabilities`
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour above which a pixel belongs to an object
MIN_OBJECT_PIXELS = 6  # smaller blobs are noise, not an object
_MIN_CONTRAST = 110.0  # object colours stand out from their background at least this much (as in the renderer)


@dataclass(frozen=True)
class Target:
    """What one prompt asks for.

    Args:
        scene: The scene a perfect model would draw (concept objects with their emblems and extras).
        concepts: Per object, the name of the concept it is, or None; empty = no concepts.
        regions: Per object, the box (fractions of the side) it must be found in; empty = column bands around the
            objects (the whole image for one object).
    """

    scene: Scene
    concepts: tuple[str | None, ...] = field(default=(), metadata={"help": "per object: concept name or None"})
    regions: tuple[Box, ...] = field(default=(), metadata={"help": "per object: where to look for it"})

    def __post_init__(self) -> None:
        n = len(self.scene.objects)
        if not self.concepts:
            object.__setattr__(self, "concepts", (None,) * n)
        if not self.regions:
            object.__setattr__(self, "regions", column_regions(self.scene))
        if len(self.concepts) != n or len(self.regions) != n:
            raise ValueError(f"a target of {n} object(s) needs {n} concepts and regions, got {len(self.concepts)} "
                             f"and {len(self.regions)}.")
        for name in self.concepts:
            if name is not None:
                get_concept(name)  # raises for an unknown name
        for box in self.regions:
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"region {box!r} must be x0 < x1 and y0 < y1 within [0, 1] (fractions of the side).")

    def prompt(self, words: Mapping[str, str] | None = None) -> str:
        """The caption, each concept object named by its words: "a <pip1> <pip2> on the left, white background".

        Args:
            words: {concept name: the words to use}, for concepts whose words were renamed (default: the concept's
                own `<name1> <name2>`).
        """
        words = words or {}
        names = {i: words.get(c) or " ".join(get_concept(c).words) for i, c in enumerate(self.concepts) if c}
        return caption(self.scene, names)

    def part(self, index: int) -> Target:
        """Object `index` alone on the same background (looked for in the whole image)."""
        return Target(Scene(self.scene.background, (self.scene.objects[index],)), (self.concepts[index],))

    def region_prompt(self, index: int, words: Mapping[str, str] | None = None) -> str:
        """The prompt of object `index` alone (for regional sampling): "a small <pip1> <pip2> on the left, white
        background"."""
        return self.part(index).prompt(words)


@dataclass(frozen=True)
class ObjectScore:
    """How one object of one image scored.

    Args:
        image: Index of the image.
        index: Index of the object in its target's scene.
        box: The object found (fractions of the side), or None when its region held no object.
        predicted: The classifier's answer per head (on the found box, else on where the object should be).
        position: The nearest of the nine positions to the found box, as (column, row), or None.
        correct: Per metric of `METRICS`, whether it matches the target.
        soft: Per metric of `SOFT_METRICS`, the classifier's probability of the target's answer.
    """

    image: int
    index: int
    box: Box | None
    predicted: dict[str, str]
    position: tuple[str, str] | None
    correct: dict[str, bool]
    soft: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Targets.


def column_regions(scene: Scene) -> tuple[Box, ...]:
    """Full-height bands, one per object, split halfway between neighbouring objects' columns (the whole image for a
    single object)."""
    return column_bands([obj.column for obj in scene.objects])


def column_bands(columns: Sequence[str]) -> tuple[Box, ...]:
    """`column_regions` for objects in these columns."""
    centres = {"left": 0.2, "center": 0.5, "right": 0.8}
    xs = [centres[column] for column in columns]
    order = sorted(set(xs))
    edges = [0.0] + [(a + b) / 2 for a, b in itertools.pairwise(order)] + [1.0]
    return tuple((edges[order.index(x)], 0.0, edges[order.index(x) + 1], 1.0) for x in xs)


def backgrounds_for(colours: Sequence[str]) -> list[str]:
    """Backgrounds every colour in `colours` stands out from (all backgrounds if none does)."""
    allowed = [b for b in BACKGROUNDS if all(contrast(c, b) >= _MIN_CONTRAST for c in colours)]
    return allowed or list(BACKGROUNDS)


def concept_targets(concept: Concept, n: int, seed: int = 0, size: str = "medium") -> list[Target]:
    """`n` single-object prompts of a concept at varied positions and backgrounds (deterministic).

    Positions cycle through the three columns (middle row first, then top and bottom); backgrounds cycle through
    those the concept's colour stands out from, starting at a seeded place.
    """
    if n < 1:
        raise ValueError(f"n {n!r} must be at least 1.")
    positions = [(column, row) for row in ("middle", "top", "bottom") for column in COLUMNS]
    backgrounds = backgrounds_for([concept.colour])
    start = int(np.random.default_rng([seed, sum(map(ord, concept.name))]).integers(len(backgrounds)))
    targets = []
    for i in range(n):
        column, row = positions[i % len(positions)]
        scene = Scene(backgrounds[(start + i) % len(backgrounds)], (concept.object(column, row, size),))
        targets.append(Target(scene, (concept.name,)))
    return targets


def random_targets(n: int, seed: int = 0, n_objects: int | None = None) -> list[Target]:
    """`n` prompts of the base world (random scenes as in training, no concepts), deterministic in `seed`."""
    rng = np.random.default_rng([seed, 5])
    return [Target(random_scene(rng, n_objects)) for _ in range(n)]


def composition_target(concepts: Sequence[Concept], background: str | None = None, row: str = "middle") -> Target:
    """Two or three concepts side by side (left/right, or left/center/right), each in its column band.

    Sizes follow the base world's multi-object scenes: medium for two, small for three. The background is the first
    one every concept's colour stands out from, unless given.
    """
    if not 2 <= len(concepts) <= 3:
        raise ValueError(f"a composition holds two or three concepts, got {len(concepts)}.")
    columns = ("left", "right") if len(concepts) == 2 else COLUMNS
    size = "medium" if len(concepts) == 2 else "small"
    background = background or backgrounds_for([c.colour for c in concepts])[0]
    objects = tuple(c.object(column, row, size) for c, column in zip(concepts, columns))
    return Target(Scene(background, objects), tuple(c.name for c in concepts))


def box_pixels(box: Box, size: int) -> tuple[int, int, int, int]:
    """A fractional box as whole pixels (x0, y0, x1, y1) of a `size` x `size` image, at least one pixel wide."""
    x0, y0, x1, y1 = (round(float(v) * size) for v in box)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


# ---------------------------------------------------------------------------------------------------------------
# Finding objects.


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's one-pixel border, (3,) float: (H, W, 3) uint8 in."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of a bool mask (an all-False mask if it is empty)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    height, width = mask.shape
    best, best_size, current = 0, 0, 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        current += 1
        labels[y, x] = current
        stack, count = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            count += 1
            for ny in range(max(cy - 1, 0), min(cy + 2, height)):
                for nx in range(max(cx - 1, 0), min(cx + 2, width)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = current
                        stack.append((ny, nx))
        if count > best_size:
            best, best_size = current, count
    return labels == best if best else np.zeros_like(mask)


def _dilated(mask: np.ndarray) -> np.ndarray:
    """A bool mask grown by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.any([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)


def find_object(image: np.ndarray, region: Box = (0.0, 0.0, 1.0, 1.0),
                threshold: float = FOREGROUND_DISTANCE) -> Box | None:
    """The box of the largest blob of non-background pixels inside `region`, or None if there is none. Pixels at
    most two apart count as one blob, so that ink in the background's colour (a white spiral on a white background)
    does not cut an object into pieces.

    Args:
        image: (H, W, 3) uint8, square.
        region: Where to look, fractions of the side.
        threshold: RGB distance from the background colour (the border's median) that makes a pixel foreground.

    Returns:
        (x0, y0, x1, y1) as fractions of the side.
    """
    size = image.shape[0]
    distance = np.linalg.norm(image.astype(np.float32) - background_colour(image), axis=-1)  # (H, W)
    x0, y0, x1, y1 = box_pixels(region, size)
    inside = np.zeros_like(distance, dtype=bool)
    inside[y0:y1, x0:x1] = True
    foreground = (distance > threshold) & inside
    # Blobs one or two pixels apart are one object (a pattern or emblem in the background's colour cuts through it)
    blob = _largest_component(_dilated(foreground) & inside) & foreground
    if blob.sum() < MIN_OBJECT_PIXELS:
        return None
    ys, xs = np.nonzero(blob)
    return xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size


def mask_box(mask: np.ndarray) -> Box | None:
    """The box of a bool mask (fractions of the side), or None if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    size = mask.shape[0]
    return xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size


@functools.lru_cache(maxsize=1024)
def _anchors(obj: ToyObject, size: int) -> dict[tuple[str, str], tuple[float, float]]:
    """Centres of `obj`'s box at each of the nine positions, as the renderer draws it (no offset)."""
    anchors = {}
    for column in COLUMNS:
        for row in ROWS:
            placed = dataclasses.replace(obj, column=column, row=row, offset=(0.0, 0.0))
            box = mask_box(render_with_masks(Scene("white", (placed,)), size)[1][0])
            anchors[(column, row)] = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return anchors


def position_of(box: Box, obj: ToyObject, size: int = 64) -> tuple[str, str]:
    """The (column, row) whose rendered box centre, for an object like `obj`, is nearest to `box`'s centre."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    anchors = _anchors(obj, size)
    return min(anchors, key=lambda k: (anchors[k][0] - cx) ** 2 + (anchors[k][1] - cy) ** 2)


def expected_boxes(scene: Scene, size: int = 64) -> list[Box]:
    """Where each object of `scene` is when rendered (its visible pixels; its region centre if hidden)."""
    boxes = []
    for obj, mask, region in zip(scene.objects, render_with_masks(scene, size)[1], column_regions(scene)):
        boxes.append(mask_box(mask) or region)
    return boxes


# ---------------------------------------------------------------------------------------------------------------
# Scoring.


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def score_images(classifier, images: Sequence, targets: Sequence[Target]) -> list[ObjectScore]:
    """Find, classify and check every target object in every image.

    Args:
        classifier: An `AttributeClassifier` (anything with its `predict(images, boxes)`).
        images: PIL images or (H, W, 3) uint8 arrays, square, all of one size.
        targets: One target per image.

    Returns:
        One `ObjectScore` per object of each target, image by image.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets: give one target per image.")
    arrays = [_as_array(image) for image in images]
    found, rows = [], []  # per object: the found box; (image index, object index, box to classify)
    for i, (array, target) in enumerate(zip(arrays, targets)):
        expected = None
        for j, region in enumerate(target.regions):
            box = find_object(array, region)
            if box is None:
                expected = expected or expected_boxes(target.scene, array.shape[0])
            found.append(box)
            rows.append((i, j, box or expected[j]))
    if not rows:
        return []
    pixels = torch.from_numpy(np.stack([arrays[i] for i, _, _ in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    boxes = torch.tensor([box for _, _, box in rows], dtype=torch.float32)
    concept_p = None
    if hasattr(classifier, "probabilities"):  # one pass gives both the answers and the soft scores
        probabilities = classifier.probabilities(pixels, boxes)
        predicted, concept_p = classifier.answers(probabilities), probabilities["concept"]
    else:
        predicted = classifier.predict(pixels, boxes)
    scores = []
    for k, ((i, j, _), box, answer) in enumerate(zip(rows, found, predicted)):
        target = targets[i]
        obj = target.scene.objects[j]
        truth = {"shape": obj.shape, "colour": obj.colour, "pattern": obj.pattern, "accessory": obj.accessory,
                 "background": target.scene.background}
        position = position_of(box, obj, arrays[i].shape[0]) if box is not None else None
        correct = {"found": box is not None, "identity": answer.get("concept") == (target.concepts[j] or "none")}
        correct.update({head: answer.get(head) == truth[head] for head in HEADS})
        correct["position"] = position == (obj.column, obj.row)
        correct["identity_strict"] = correct["identity"] and correct["shape"] and correct["colour"]
        soft = {}
        if concept_p is not None:
            soft["identity_p"] = float(concept_p[k, classifier.heads["concept"].index(target.concepts[j] or "none")])
        scores.append(ObjectScore(i, j, box, dict(answer), position, correct, soft))
    return scores


def summarize(scores: Sequence[ObjectScore], metrics: Sequence[str] = METRICS + SOFT_METRICS) -> dict[str, float]:
    """The share of objects right per metric of `METRICS`, the mean of each of `SOFT_METRICS` (NaN for no scores)."""
    def value(score: ObjectScore, metric: str) -> float:
        return score.correct[metric] if metric in score.correct else score.soft.get(metric, float("nan"))

    return {m: float(np.mean([value(s, m) for s in scores])) if scores else float("nan") for m in metrics}


def binding_summary(scores: Sequence[ObjectScore], targets: Sequence[Target]) -> dict[str, float]:
    """Regional binding of multi-region images.

    Returns:
        `binding`: the share of regions whose object is the region's concept; `binding_p`: the classifier's mean
        probability of that concept (soft); `all_bound`: the share of images of several regions in which every
        region is; `swapped`: the share of regions of such images holding another region's concept. The last two
        are NaN when no image has several regions (single objects: a binding ceiling).
    """
    if not scores:
        return {"binding": float("nan"), "binding_p": float("nan"), "all_bound": float("nan"),
                "swapped": float("nan")}
    by_image: dict[int, list[bool]] = {}
    swapped = []
    for s in scores:
        concepts = targets[s.image].concepts
        if len(concepts) > 1:
            by_image.setdefault(s.image, []).append(s.correct["identity"])
            others = {c for k, c in enumerate(concepts) if k != s.index and c}
            swapped.append(s.predicted.get("concept") in others)
    return {"binding": float(np.mean([s.correct["identity"] for s in scores])),
            "binding_p": summarize(scores, ("identity_p",))["identity_p"],
            "all_bound": float(np.mean([all(v) for v in by_image.values()])) if by_image else float("nan"),
            "swapped": float(np.mean(swapped)) if swapped else float("nan")}
