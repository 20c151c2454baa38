"""The toy world: a procedural renderer of small scenes, concepts the base model never saw, and their captions."""

from .render import (
    ACCESSORIES,
    BACKGROUNDS,
    COLOURS,
    COLUMNS,
    PATTERNS,
    ROWS,
    SHAPES,
    SIZES,
    Scene,
    ToyObject,
    caption,
    object_phrase,
    random_scene,
    render,
    render_with_masks,
)

__all__ = [
    "ACCESSORIES",
    "BACKGROUNDS",
    "COLOURS",
    "COLUMNS",
    "PATTERNS",
    "ROWS",
    "SHAPES",
    "SIZES",
    "Scene",
    "ToyObject",
    "caption",
    "object_phrase",
    "random_scene",
    "render",
    "render_with_masks",
]
