"""The toy world's procedural renderer: scene descriptions, 64x64 images with per-object masks, and captions.

A `Scene` is a background colour and one to three `ToyObject`s (shape, colour, pattern, accessory, position, size).
`render_with_masks` draws it with PIL on a supersampled canvas and box-filters it down, so the same scene always
gives the same pixels; `caption` describes it in a small fixed grammar:

    >>> scene = Scene("beige", (ToyObject("circle", "red", "striped", "hat", column="left"),))
    >>> caption(scene)
    'a red striped circle with a hat on the left, beige background'

Emblems and silhouette extras (`ToyObject.emblem`, `ToyObject.extra`) exist only for the concepts of
`mixofshow.toyworld.concepts`: `random_scene` never draws them and `caption` never names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Named colours (RGB). Object colours and background colours are separate palettes; see `random_scene`.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (50, 170, 70),
    "blue": (45, 95, 220),
    "purple": (135, 60, 190),
    "pink": (245, 130, 185),
    "brown": (130, 80, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "beige": (225, 205, 165),
    "mint": (175, 230, 200),
    "lavender": (205, 190, 235),
    "navy": (30, 35, 80),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
PATTERNS = ("plain", "striped", "dotted", "checked")
ACCESSORIES = ("none", "hat", "crown", "bow", "glasses")
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
SIZES = ("small", "medium", "large")
# Concept-only details, drawn by the renderer but never sampled by `random_scene` nor named by `caption`.
EMBLEMS = ("face", "bolt", "eye", "spiral", "cross", "zigzag")
EXTRAS = ("ears", "antenna", "wings")

# Geometry, in fractions of the image side.
_COLUMN_X = {"left": 0.2, "center": 0.5, "right": 0.8}
_ROW_Y = {"top": 0.3, "middle": 0.52, "bottom": 0.72}
_RADIUS = {"small": 0.11, "medium": 0.16, "large": 0.22}
_MARGIN = 0.02
_HEADROOM = {"none": 0.0, "hat": 0.8, "crown": 0.6, "bow": 0.5, "glasses": 0.0}  # accessory height above, in radii
_EXTRA_HEADROOM = {"ears": 0.45, "antenna": 0.7, "wings": 0.0}
# Pattern ink per object colour: white on dark colours, near-black on light ones.
_LIGHT_COLOURS = ("orange", "yellow", "pink")
_DARK_INK, _LIGHT_INK = (35, 35, 35), (250, 250, 250)
_MIN_CONTRAST = 110.0  # minimum RGB distance between an object colour and its background in random scenes
_SUPERSAMPLE = 4


def _check(value, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(map(repr, allowed))}.")


@dataclass(frozen=True)
class ToyObject:
    """One object of a toy scene.

    Args:
        shape: One of `SHAPES`.
        colour: One of `COLOURS`.
        pattern: One of `PATTERNS`, drawn inside the silhouette.
        accessory: One of `ACCESSORIES` (`"none"` for nothing), drawn on or above the object.
        column: Horizontal position, one of `COLUMNS`.
        row: Vertical position, one of `ROWS`.
        size: One of `SIZES`.
        offset: A small (dx, dy) shift in fractions of the image side, for variety within a position.
        emblem: Concept-only mark drawn on the object, one of `EMBLEMS`, or None.
        extra: Concept-only silhouette extra, one of `EXTRAS`, or None.
    """

    shape: str
    colour: str
    pattern: str = "plain"
    accessory: str = "none"
    column: str = "center"
    row: str = "middle"
    size: str = "medium"
    offset: tuple[float, float] = (0.0, 0.0)
    emblem: str | None = field(default=None, metadata={"help": "concept-only"})
    extra: str | None = field(default=None, metadata={"help": "concept-only"})

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.pattern, PATTERNS, "pattern")
        _check(self.accessory, ACCESSORIES, "accessory")
        _check(self.column, COLUMNS, "column")
        _check(self.row, ROWS, "row")
        _check(self.size, SIZES, "size")
        if self.emblem is not None:
            _check(self.emblem, EMBLEMS, "emblem")
        if self.extra is not None:
            _check(self.extra, EXTRAS, "extra")
        if len(self.offset) != 2 or any(abs(v) > 0.1 for v in self.offset):
            raise ValueError(f"offset {self.offset!r} must be two numbers within [-0.1, 0.1] (fractions of the side).")


@dataclass(frozen=True)
class Scene:
    """A toy scene: a background colour and one to three objects, drawn in order (later ones on top).

    Args:
        background: One of `BACKGROUNDS`.
        objects: The objects, one to three.
    """

    background: str
    objects: tuple[ToyObject, ...]

    def __post_init__(self) -> None:
        _check(self.background, BACKGROUNDS, "background")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds one to three objects, got {len(self.objects)}.")


# ---------------------------------------------------------------------------------------------------------------
# Geometry: every shape is a polygon around (cx, cy) with "radius" r, in canvas pixels.


def _regular(cx: float, cy: float, radii: list[float], start: float = -math.pi / 2) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(start + 2 * math.pi * i / n), cy + r * math.sin(start + 2 * math.pi * i / n))
            for i, r in enumerate(radii)]


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(72):
        t = 2 * math.pi * i / 72
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((cx + x * r / 16.5, cy - (y + 2.5) * r / 15.0))
    return points


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "circle":
        return _regular(cx, cy, [r] * 64)
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return _regular(cx, cy + 0.2 * r, [1.2 * r] * 3)
    if shape == "star":
        return _regular(cx, cy + 0.08 * r, [1.15 * r, 0.5 * r] * 5)
    if shape == "heart":
        return _heart(cx, cy, r)
    if shape == "diamond":
        return [(cx, cy - 1.15 * r), (cx + 0.8 * r, cy), (cx, cy + 1.15 * r), (cx - 0.8 * r, cy)]
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def _centre(obj: ToyObject, side: int) -> tuple[float, float, float]:
    """The object's centre and radius in canvas pixels, clamped so the object and what sits on it stay in frame."""
    r = _RADIUS[obj.size]
    above = r * (1.0 + max(_HEADROOM[obj.accessory], _EXTRA_HEADROOM.get(obj.extra, 0.0) if obj.extra else 0.0))
    half_width = r * (1.6 if obj.extra == "wings" else 1.0)
    cx = min(max(_COLUMN_X[obj.column] + obj.offset[0], half_width + _MARGIN), 1 - half_width - _MARGIN)
    cy = min(max(_ROW_Y[obj.row] + obj.offset[1], above + _MARGIN), 1 - 1.15 * r - _MARGIN)
    return cx * side, cy * side, r * side


def object_geometry(obj: ToyObject) -> tuple[float, float, float]:
    """The object's centre (x, y) and radius as fractions of the image's side, where `render` draws it."""
    return _centre(obj, 1)


def nearest_place(x: float, y: float) -> tuple[str, str]:
    """The (column, row) whose nominal centre is nearest to (x, y), fractions of the side."""
    column = min(COLUMNS, key=lambda c: abs(_COLUMN_X[c] - x))
    row = min(ROWS, key=lambda r: abs(_ROW_Y[r] - y))
    return column, row


def _ink(colour: str) -> tuple[int, int, int]:
    return _DARK_INK if colour in _LIGHT_COLOURS else _LIGHT_INK


# ---------------------------------------------------------------------------------------------------------------
# Drawing: each function draws onto a canvas-sized image (colour) and/or its coverage mask ("L").


def _draw_pattern(draw: ImageDraw.ImageDraw, pattern: str, cx: float, cy: float, r: float, ink, px: float) -> None:
    """The pattern inside the object's bounding box; `px` is one output pixel in canvas pixels."""
    box = (cx - 1.7 * r, cy - 1.7 * r, cx + 1.7 * r, cy + 1.7 * r)
    if pattern == "striped":
        period = max(0.55 * r, 4 * px)
        y = cy - period * math.ceil((cy - box[1]) / period)
        while y < box[3]:
            draw.rectangle((box[0], y, box[2], y + period / 2), fill=ink)
            y += period
    elif pattern == "dotted":
        period = max(0.6 * r, 5 * px)
        dot = max(0.13 * r, 1.1 * px)
        offset_rows = 0
        y = cy - period * math.ceil((cy - box[1]) / period)
        while y < box[3] + period:
            x = cx - period * math.ceil((cx - box[0]) / period) + (period / 2 if offset_rows % 2 else 0.0)
            while x < box[2] + period:
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=ink)
                x += period
            y += period
            offset_rows += 1
    elif pattern == "checked":
        cell = max(0.45 * r, 3 * px)
        n = math.ceil(1.7 * r / cell) + 1
        for i in range(-n, n):
            for j in range(-n, n):
                if (i + j) % 2 == 0:
                    x0, y0 = cx + i * cell, cy + j * cell
                    draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=ink)


def _draw_extra(draw: ImageDraw.ImageDraw, extra: str, cx: float, cy: float, r: float, top: float, fill, px) -> None:
    """Concept-only silhouette extras, drawn in `fill` (the object colour on the image, 255 on the mask)."""
    if extra == "ears":
        for side in (-1, 1):
            base = cx + side * 0.55 * r
            draw.polygon([(base - 0.35 * r, top + 0.35 * r), (base + 0.35 * r, top + 0.35 * r),
                          (base + side * 0.15 * r, top - 0.45 * r)], fill=fill)
    elif extra == "antenna":
        width = max(0.12 * r, 1.2 * px)
        draw.rectangle((cx - width / 2, top - 0.55 * r, cx + width / 2, top + 0.2 * r), fill=fill)
        ball = max(0.18 * r, 1.6 * px)
        draw.ellipse((cx - ball, top - 0.55 * r - ball, cx + ball, top - 0.55 * r + ball), fill=fill)
    elif extra == "wings":
        for side in (-1, 1):
            x = cx + side * 0.8 * r
            draw.polygon([(x, cy - 0.35 * r), (x + side * 0.8 * r, cy - 0.7 * r), (x + side * 0.6 * r, cy + 0.1 * r),
                          (x, cy + 0.25 * r)], fill=fill)


def _draw_emblem(draw: ImageDraw.ImageDraw, emblem: str, cx: float, cy: float, r: float, px: float) -> None:
    """Concept-only marks drawn on the object."""
    line = max(round(0.12 * r), round(1.2 * px))
    if emblem == "face":
        eye = max(0.16 * r, 1.3 * px)
        for side in (-1, 1):
            ex, ey = cx + side * 0.35 * r, cy - 0.2 * r
            draw.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(255, 255, 255))
            pupil = eye * 0.55
            draw.ellipse((ex - pupil, ey - pupil, ex + pupil, ey + pupil), fill=(20, 20, 20))
        draw.arc((cx - 0.45 * r, cy - 0.3 * r, cx + 0.45 * r, cy + 0.5 * r), 20, 160, fill=(20, 20, 20), width=line)
    elif emblem == "bolt":
        s = 0.75 * r
        points = [(0.1, -1.0), (-0.45, 0.1), (-0.02, 0.1), (-0.15, 1.0), (0.45, -0.15), (0.02, -0.15)]
        draw.polygon([(cx + x * s, cy + y * s) for x, y in points], fill=(255, 240, 120), outline=(30, 30, 30))
    elif emblem == "eye":
        draw.ellipse((cx - 0.6 * r, cy - 0.38 * r, cx + 0.6 * r, cy + 0.38 * r), fill=(255, 255, 255))
        iris = 0.3 * r
        draw.ellipse((cx - iris, cy - iris, cx + iris, cy + iris), fill=(40, 170, 90))
        pupil = 0.14 * r
        draw.ellipse((cx - pupil, cy - pupil, cx + pupil, cy + pupil), fill=(10, 10, 10))
    elif emblem == "spiral":
        points = []
        for i in range(80):
            t = i / 79 * 2.6 * 2 * math.pi
            rr = 0.08 * r + 0.6 * r * i / 79
            points.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
        draw.line(points, fill=(255, 255, 255), width=line, joint="curve")
    elif emblem == "cross":
        arm, half = 0.6 * r, max(0.17 * r, 1.2 * px)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=(255, 235, 60))
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=(255, 235, 60))
    elif emblem == "zigzag":
        xs = np.linspace(cx - 0.75 * r, cx + 0.75 * r, 7)
        points = [(float(x), cy + (0.25 * r if i % 2 else -0.1 * r)) for i, x in enumerate(xs)]
        draw.line(points, fill=(30, 30, 30), width=line, joint="curve")


def _draw_accessory(draw: ImageDraw.ImageDraw, accessory: str, cx: float, cy: float, r: float, top: float,
                    px: float) -> None:
    if accessory == "hat":
        brim_y = top + 0.12 * r
        draw.rectangle((cx - 0.7 * r, brim_y - 0.16 * r, cx + 0.7 * r, brim_y), fill=(40, 40, 40))
        draw.rectangle((cx - 0.42 * r, brim_y - 0.8 * r, cx + 0.42 * r, brim_y - 0.12 * r), fill=(40, 40, 40))
        band = max(0.12 * r, px)
        draw.rectangle((cx - 0.42 * r, brim_y - 0.12 * r - band, cx + 0.42 * r, brim_y - 0.12 * r),
                       fill=(200, 30, 60))
    elif accessory == "crown":
        base = top + 0.1 * r
        w, h = 0.6 * r, 0.6 * r
        points = [(cx - w, base), (cx - w, base - h), (cx - w / 2, base - 0.45 * h), (cx, base - h),
                  (cx + w / 2, base - 0.45 * h), (cx + w, base - h), (cx + w, base)]
        draw.polygon(points, fill=(240, 190, 20), outline=(120, 80, 0))
    elif accessory == "bow":
        y = top - 0.12 * r
        w, h = 0.55 * r, 0.32 * r
        draw.polygon([(cx, y), (cx - w, y - h), (cx - w, y + h)], fill=(230, 30, 140))
        draw.polygon([(cx, y), (cx + w, y - h), (cx + w, y + h)], fill=(230, 30, 140))
        knot = max(0.13 * r, px)
        draw.ellipse((cx - knot, y - knot, cx + knot, y + knot), fill=(150, 0, 80))
    elif accessory == "glasses":
        lens = 0.26 * r
        width = max(round(0.09 * r), round(px))
        ey = cy - 0.15 * r
        for side in (-1, 1):
            ex = cx + side * 0.36 * r
            draw.ellipse((ex - lens, ey - lens, ex + lens, ey + lens), fill=(190, 230, 250), outline=(15, 15, 15),
                         width=width)
        draw.line([(cx - 0.1 * r, ey), (cx + 0.1 * r, ey)], fill=(15, 15, 15), width=width)


class _CoverageDraw:
    """An ImageDraw look-alike for an "L" coverage mask: every fill and outline colour becomes 255."""

    def __init__(self, mask: Image.Image) -> None:
        self._draw = ImageDraw.Draw(mask)

    def __getattr__(self, name: str):
        method = getattr(self._draw, name)

        def painted(*args, **kwargs):
            for key in ("fill", "outline"):
                if kwargs.get(key) is not None:
                    kwargs[key] = 255
            return method(*args, **kwargs)

        return painted


def _draw_object(canvas: Image.Image, obj: ToyObject, ss: int) -> Image.Image:
    """Draw `obj` onto `canvas` (in place); return its coverage on the canvas ("L", 255 = covered)."""
    side = canvas.width
    px = float(ss)  # one output pixel, in canvas pixels
    cx, cy, r = _centre(obj, side)
    polygon = _shape_polygon(obj.shape, cx, cy, r)
    top = min(y for _, y in polygon)
    colour = COLOURS[obj.colour]

    body = Image.new("L", canvas.size, 0)  # the silhouette, extras included: where the object's colour goes
    body_draw = ImageDraw.Draw(body)
    body_draw.polygon(polygon, fill=255)
    if obj.extra is not None:
        _draw_extra(body_draw, obj.extra, cx, cy, r, top, 255, px)

    layer = Image.new("RGB", canvas.size, colour)
    if obj.pattern != "plain":
        pattern_mask = Image.new("L", canvas.size, 0)
        _draw_pattern(ImageDraw.Draw(pattern_mask), obj.pattern, cx, cy, r, 255, px)
        # Patterns stay on the shape itself, not on the extras.
        shape_only = Image.new("L", canvas.size, 0)
        ImageDraw.Draw(shape_only).polygon(polygon, fill=255)
        pattern_mask = Image.fromarray(np.minimum(np.asarray(pattern_mask), np.asarray(shape_only)))
        layer.paste(_ink(obj.colour), mask=pattern_mask)
    canvas.paste(layer, mask=body)

    # Emblems and accessories: drawn straight on the canvas and recorded in the coverage.
    draw = ImageDraw.Draw(canvas)
    if obj.emblem is not None:
        _draw_emblem(draw, obj.emblem, cx, cy, r, px)
    if obj.accessory != "none":
        _draw_accessory(draw, obj.accessory, cx, cy, r, top, px)
        _draw_accessory(_CoverageDraw(body), obj.accessory, cx, cy, r, top, px)
    return body


def render_with_masks(scene: Scene, size: int = 64, supersample: int = _SUPERSAMPLE) -> tuple[Image.Image,
                                                                                             list[np.ndarray]]:
    """Draw a scene and the visible part of each object.

    Args:
        scene: What to draw.
        size: Side of the square output image, in pixels.
        supersample: The scene is drawn `supersample` times larger and box-filtered down (anti-aliasing).

    Returns:
        The RGB image (`size` x `size`) and, per object in `scene.objects` order, a bool array (size, size) that is
        True where that object (accessory included) is visible: covered for at least half a pixel and not hidden by
        a later object.
    """
    if size < 16:
        raise ValueError(f"size {size!r} is too small to draw a toy scene; use at least 16 pixels.")
    if supersample < 1:
        raise ValueError(f"supersample {supersample!r} must be a positive integer.")
    canvas_side = size * supersample
    canvas = Image.new("RGB", (canvas_side, canvas_side), BACKGROUNDS[scene.background])
    coverages = [_draw_object(canvas, obj, supersample) for obj in scene.objects]
    image = canvas.resize((size, size), Image.Resampling.BOX)
    masks, hidden = [], np.zeros((size, size), dtype=bool)
    for coverage in reversed(coverages):
        covered = np.asarray(coverage.resize((size, size), Image.Resampling.BOX)) >= 128
        masks.append(covered & ~hidden)
        hidden |= covered
    return image, masks[::-1]


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as a `size` x `size` RGB image; the same scene always gives the same pixels."""
    return render_with_masks(scene, size)[0]


def moved_object(image: Image.Image, mask: np.ndarray, source: ToyObject, target: ToyObject, background: str
                 ) -> tuple[Image.Image, np.ndarray]:
    """An object cut out of a rendered image by its mask, rescaled and moved to `target`'s size and place, on a
    plain background: the zoom-out augmentation of concept training images (no new rendering).

    Args:
        image: The square RGB image `source` was rendered in (alone, fully visible).
        mask: Its (side, side) bool mask, as `render_with_masks` returns it.
        source: The object as rendered.
        target: Where and how large it goes (its column, row, size and offset are used).
        background: One of `BACKGROUNDS`.

    Returns:
        The new image and the moved object's bool mask.
    """
    side = image.width
    if image.size != (side, side) or mask.shape != (side, side):
        raise ValueError(f"image {image.size} and mask {mask.shape} must be one square size.")
    sx, sy, source_r = _centre(source, side)
    tx, ty, target_r = _centre(target, side)
    scale = target_r / source_r
    cutout = image.convert("RGBA")
    cutout.putalpha(Image.fromarray(mask.astype(np.uint8) * 255))
    scaled_side = max(round(side * scale), 1)
    # Premultiplied alpha, so the cut edge does not pull in the old background's colour when it is resampled
    scaled = cutout.convert("RGBa").resize((scaled_side, scaled_side), Image.Resampling.BOX).convert("RGBA")
    corner = (round(tx - sx * scale), round(ty - sy * scale))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    layer.paste(scaled, corner)
    moved = Image.new("RGB", (side, side), BACKGROUNDS[background])
    moved.paste(layer, mask=layer.getchannel("A"))
    return moved, np.asarray(layer.getchannel("A")) >= 128


# ---------------------------------------------------------------------------------------------------------------
# Captions.

_POSITION_PHRASES = {
    ("left", "middle"): "on the left",
    ("center", "middle"): "in the center",
    ("right", "middle"): "on the right",
    ("left", "top"): "at the top left",
    ("center", "top"): "at the top",
    ("right", "top"): "at the top right",
    ("left", "bottom"): "at the bottom left",
    ("center", "bottom"): "at the bottom",
    ("right", "bottom"): "at the bottom right",
}


def object_phrase(obj: ToyObject, name: str | None = None) -> str:
    """One object in the caption grammar: "a small red striped circle with a hat on the left".

    Args:
        obj: The object.
        name: If given, it replaces the object's identity (colour, pattern, shape), e.g. "<TOK>" for a concept:
            "a <TOK> with a hat on the left". Size, accessory and position are still described.
    """
    words = [] if obj.size == "medium" else [obj.size]
    if name is None:
        words += [obj.colour] + ([] if obj.pattern == "plain" else [obj.pattern]) + [obj.shape]
    else:
        words.append(name)
    article = "an" if name is None and words[0][0] in "aeiou" else "a"
    phrase = f"{article} {' '.join(words)}"
    if obj.accessory != "none":
        phrase += f" with {'' if obj.accessory == 'glasses' else 'a '}{obj.accessory}"
    return f"{phrase} {_POSITION_PHRASES[(obj.column, obj.row)]}"


def caption(scene: Scene, names: dict[int, str] | None = None) -> str:
    """The scene's caption: object phrases joined by "and", then the background.

    Args:
        scene: The scene.
        names: Optional {object index: name}; a named object is described by its name instead of its identity
            (see `object_phrase`).

    Returns:
        E.g. "a red circle on the left and a large blue dotted star with a crown on the right, navy background".
    """
    names = names or {}
    for index in names:
        if not 0 <= index < len(scene.objects):
            raise ValueError(f"names has object index {index}, but the scene has {len(scene.objects)} object(s).")
    phrases = [object_phrase(obj, names.get(i)) for i, obj in enumerate(scene.objects)]
    return f"{' and '.join(phrases)}, {scene.background} background"


# ---------------------------------------------------------------------------------------------------------------
# Random scenes.


def contrast(colour: str, background: str) -> float:
    """RGB distance between an object colour and a background colour."""
    return float(np.linalg.norm(np.subtract(COLOURS[colour], BACKGROUNDS[background])))


def random_object(rng: np.random.Generator, background: str, column: str, sizes: tuple[str, ...] = SIZES,
                  accessory_p: float = 0.4, pattern_p: float = 0.5) -> ToyObject:
    """A random object (no emblem, no extra) at `column` whose colour stands out from `background`."""
    colours = [c for c in COLOURS if contrast(c, background) >= _MIN_CONTRAST]
    patterns = PATTERNS[1:] if rng.random() < pattern_p else ("plain",)
    accessories = ACCESSORIES[1:] if rng.random() < accessory_p else ("none",)
    return ToyObject(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(colours)),
        pattern=str(rng.choice(patterns)),
        accessory=str(rng.choice(accessories)),
        column=column,
        row=str(rng.choice(ROWS)),
        size=str(rng.choice(sizes)),
        offset=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
    )


def scene_layout(rng: np.random.Generator, n_objects: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Columns and allowed sizes for `n_objects` objects that do not overlap much."""
    if n_objects == 1:
        return (str(rng.choice(COLUMNS)),), SIZES
    if n_objects == 2:
        return ("left", "right"), ("small", "medium")
    if n_objects == 3:
        return COLUMNS, ("small",)
    raise ValueError(f"n_objects {n_objects!r} must be 1, 2 or 3.")


def random_scene(rng: np.random.Generator, n_objects: int | None = None,
                 object_weights: tuple[float, float, float] = (0.5, 0.35, 0.15)) -> Scene:
    """A random scene of the base world (no concept details).

    Args:
        rng: The only source of randomness; the same generator state gives the same scene.
        n_objects: 1, 2 or 3; None draws it with `object_weights`.
        object_weights: Probabilities of one, two and three objects when `n_objects` is None.

    Returns:
        The scene. Several objects stand in distinct columns (two: left and right); object colours always
        contrast with the background.
    """
    if n_objects is None:
        n_objects = int(rng.choice(3, p=np.asarray(object_weights) / np.sum(object_weights))) + 1
    background = str(rng.choice(list(BACKGROUNDS)))
    columns, sizes = scene_layout(rng, n_objects)
    objects = tuple(random_object(rng, background, column, sizes) for column in columns)
    return Scene(background, objects)
