"""The toy world's concepts: characters the base model never saw, and the concept folders ED-LoRA trains on.

Each concept is an ordinary toy object (its class word, e.g. "circle", is in the base model's world) plus details
only concepts have: an emblem drawn on it and a silhouette extra. Some are deliberately alike, so that fusion
methods can be told apart: `pip` and `rex` are both red-ish circles, `nova` and `vega` both blue-ish stars.

    write_concept_folder(get_concept("pip"), "data/pip")   # data/pip/images/*.png + *.txt, data/pip/masks/*.png
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .render import (
    ACCESSORIES,
    BACKGROUNDS,
    COLOURS,
    COLUMNS,
    EMBLEMS,
    EXTRAS,
    PATTERNS,
    ROWS,
    SHAPES,
    Scene,
    ToyObject,
    caption,
    contrast,
    moved_object,
    random_object,
    render_with_masks,
    scene_layout,
)

PLACEHOLDER = "<TOK>"  # the same placeholder as mixofshow.data.CONCEPT_PLACEHOLDER
_MIN_CONTRAST = 110.0
# Training image sizes in turn; medium first, the size single-concept prompts draw.
_TRAINING_SIZES = ("medium", "large", "small")
# Where the first ED-LoRA word starts: a random vector (the official recipe) or the concept's colour word
FIRST_WORDS = ("random", "colour")


def check_first_word(first_word: str) -> None:
    """Raise naming the choices unless `first_word` is one of `FIRST_WORDS`."""
    if first_word not in FIRST_WORDS:
        raise ValueError(f"first_word {first_word!r}: choose one of {', '.join(FIRST_WORDS)}.")


@dataclass(frozen=True)
class Concept:
    """A toy-world character.

    Args:
        name: Short lowercase name; the ED-LoRA words are `<name1>` and `<name2>`.
        class_word: The object's shape, the in-domain word ED-LoRA initialises the second word from.
        colour: One of `COLOURS`.
        pattern: One of `PATTERNS`.
        emblem: The concept-only mark drawn on it, one of `EMBLEMS`.
        extra: The concept-only silhouette extra, one of `EXTRAS`, or None.
        description: What it looks like, in words (for people; captions never use it).
    """

    name: str = field(metadata={"help": "short lowercase name; ED-LoRA words <name1> <name2>"})
    class_word: str = field(metadata={"help": "the shape, in the base model's vocabulary"})
    colour: str = field(metadata={"help": "one of COLOURS"})
    pattern: str = field(default="plain", metadata={"help": "one of PATTERNS"})
    emblem: str = field(default="face", metadata={"help": "concept-only mark, one of EMBLEMS"})
    extra: str | None = field(default=None, metadata={"help": "concept-only silhouette extra, one of EXTRAS"})
    description: str = field(default="", metadata={"help": "for people"})

    def __post_init__(self) -> None:
        if not self.name.isalpha() or not self.name.islower():
            raise ValueError(f"concept name {self.name!r} must be lowercase letters only.")
        for value, allowed, what in ((self.class_word, SHAPES, "class_word"), (self.colour, COLOURS, "colour"),
                                     (self.pattern, PATTERNS, "pattern"), (self.emblem, EMBLEMS, "emblem")):
            if value not in allowed:
                raise ValueError(f"concept {self.name!r}: {what} {value!r} is not one of {', '.join(allowed)}.")
        if self.extra is not None and self.extra not in EXTRAS:
            raise ValueError(f"concept {self.name!r}: extra {self.extra!r} is not one of {', '.join(EXTRAS)}.")

    @property
    def words(self) -> tuple[str, str]:
        """The two ED-LoRA concept words, e.g. ("<pip1>", "<pip2>")."""
        return f"<{self.name}1>", f"<{self.name}2>"

    @property
    def initializers(self) -> tuple[str, str]:
        """ED-LoRA initialisers for `words`: a random one and the class word (the official recipe)."""
        return "<rand-0.013>", self.class_word

    def initializers_from(self, first_word: str = "random") -> tuple[str, str]:
        """`initializers` with the first word from `first_word`: "random" (the official recipe) or "colour" (the
        concept's colour word, the other attribute of it the base model knows)."""
        check_first_word(first_word)
        return (self.colour, self.class_word) if first_word == "colour" else self.initializers

    def object(self, column: str = "center", row: str = "middle", size: str = "medium", accessory: str = "none",
               offset: tuple[float, float] = (0.0, 0.0)) -> ToyObject:
        """The concept as a `ToyObject` at a position, with an optional accessory."""
        return ToyObject(self.class_word, self.colour, self.pattern, accessory, column, row, size, offset,
                         emblem=self.emblem, extra=self.extra)


CONCEPTS: tuple[Concept, ...] = (
    Concept("pip", "circle", "red", emblem="face", extra="ears", description="a red circle with cat ears and a smile"),
    Concept("rex", "circle", "orange", emblem="bolt", extra="antenna",
            description="an orange circle with a lightning bolt and an antenna"),
    Concept("nova", "star", "blue", emblem="eye", description="a blue star with one big green eye"),
    Concept("vega", "star", "purple", emblem="spiral", extra="wings",
            description="a purple star with a white spiral and wings"),
    Concept("moss", "square", "green", pattern="striped", emblem="cross", extra="ears",
            description="a green striped square with a yellow cross and ears"),
    Concept("tula", "heart", "pink", emblem="zigzag", extra="wings",
            description="a pink heart with a zigzag and wings"),
    Concept("kiko", "triangle", "yellow", pattern="dotted", emblem="face", extra="antenna",
            description="a yellow dotted triangle with a face and an antenna"),
)


def get_concept(name: str) -> Concept:
    """The concept called `name` in `CONCEPTS`."""
    for concept in CONCEPTS:
        if concept.name == name:
            return concept
    raise ValueError(f"unknown toy concept {name!r}; choose one of {', '.join(c.name for c in CONCEPTS)}.")


def _backgrounds_for(colour: str) -> list[str]:
    return [b for b in BACKGROUNDS if contrast(colour, b) >= _MIN_CONTRAST]


def concept_scene(concept: Concept, rng: np.random.Generator, accessory_p: float = 0.25) -> Scene:
    """A random single-object scene of `concept`: random position, size (medium or large), background, accessory."""
    accessory = str(rng.choice(ACCESSORIES[1:])) if rng.random() < accessory_p else "none"
    obj = concept.object(column=str(rng.choice(COLUMNS)), row=str(rng.choice(ROWS)),
                         size=str(rng.choice(("medium", "medium", "large"))), accessory=accessory,
                         offset=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))))
    return Scene(str(rng.choice(_backgrounds_for(concept.colour))), (obj,))


def random_concept_scene(rng: np.random.Generator, concepts: tuple[Concept, ...] = CONCEPTS,
                         concept_p: float = 0.5) -> tuple[Scene, tuple[int, ...]]:
    """A random scene in which each object is, with probability `concept_p`, one of `concepts`.

    Args:
        rng: The only source of randomness.
        concepts: The concepts to draw from.
        concept_p: Probability that an object is a concept (at least one object always is).

    Returns:
        The scene and, per object, the index of its concept in `concepts`, or -1 for an ordinary object.
    """
    n_objects = int(rng.choice(3, p=[0.5, 0.35, 0.15])) + 1
    columns, sizes = scene_layout(rng, n_objects)
    is_concept = rng.random(n_objects) < concept_p
    is_concept[rng.integers(n_objects)] = True
    picks = [int(rng.integers(len(concepts))) if flag else -1 for flag in is_concept]
    colours = [concepts[p].colour for p in picks if p >= 0]
    allowed = [b for b in BACKGROUNDS if all(contrast(c, b) >= _MIN_CONTRAST for c in colours)]
    background = str(rng.choice(allowed or list(BACKGROUNDS)))
    objects = []
    for column, pick in zip(columns, picks):
        base = random_object(rng, background, column, sizes)
        if pick >= 0:
            base = concepts[pick].object(base.column, base.row, base.size, base.accessory, base.offset)
        objects.append(base)
    return Scene(background, tuple(objects)), tuple(picks)


@dataclass(frozen=True)
class ConceptFolder:
    """Where `write_concept_folder` put a concept's training data.

    Args:
        root: The folder.
        images: Images with same-name `.txt` captions (the `data` folder of `mixofshow train`).
        masks: Same-name `.png` masks, white = the concept (the `masks` folder).
        concept: The concept.
    """

    root: Path
    images: Path
    masks: Path
    concept: Concept


def concept_scenes(concept: Concept, n_images: int = 8, seed: int = 0) -> list[Scene]:
    """`n_images` varied scenes of `concept`: every column and row, every size, several backgrounds.

    The first few images cycle deterministically through positions and sizes so that even a small folder covers
    them. Small sizes matter: three-region compositions draw small objects, and a concept trained only at medium and
    large size lost its identity there (three-concept binding 6%, against 52% with small training images too).
    """
    if not 1 <= n_images <= 100:
        raise ValueError(f"n_images {n_images!r} must be between 1 and 100.")
    rng = np.random.default_rng([seed, sum(map(ord, concept.name))])
    backgrounds = _backgrounds_for(concept.colour)
    positions = [(c, r) for r in ("middle", "top", "bottom") for c in COLUMNS]
    order = rng.permutation(len(positions))
    scenes = []
    for i in range(n_images):
        column, row = positions[order[i % len(positions)]]
        accessory = str(rng.choice(ACCESSORIES[1:])) if i % 4 == 3 else "none"
        size = _TRAINING_SIZES[i % len(_TRAINING_SIZES)]
        obj = concept.object(column=column, row=row, size=size, accessory=accessory,
                             offset=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))))
        scenes.append(Scene(backgrounds[(i + int(order[0])) % len(backgrounds)], (obj,)))
    return scenes


def zoomed_out_scenes(concept: Concept, scenes: list[Scene], n: int, seed: int = 0) -> list[tuple[int, Scene]]:
    """Where `n` zoomed-out copies of a concept's training images go: per copy, the index of the medium or large
    training scene it is cut from, and the scene it becomes (the same object, small, at a place from a seeded cycle
    through the nine, on a background the concept's colour stands out from). Empty if no scene is medium or large.

    Why: a concept tuned on two small images is drawn small almost only where those showed it, so three-region
    layouts, which draw it small, miss it (benchmarks/results/2026-12-07-session13-toyworld.md). Small copies of the
    same images at every place teach the small concept without new renders.
    """
    sources = [i for i, scene in enumerate(scenes) if scene.objects[0].size != "small"]
    if n < 0:
        raise ValueError(f"zoomed-out copies {n!r} must not be negative.")
    if not sources or not n:
        return []
    rng = np.random.default_rng([seed, sum(map(ord, concept.name)), 1])
    positions = [(c, r) for r in ROWS for c in COLUMNS]
    order = rng.permutation(len(positions))
    backgrounds = _backgrounds_for(concept.colour)
    copies = []
    for k in range(n):
        source = sources[k % len(sources)]
        column, row = positions[order[k % len(positions)]]
        obj = replace(scenes[source].objects[0], column=column, row=row, size="small",
                      offset=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))))
        copies.append((source, Scene(str(rng.choice(backgrounds)), (obj,))))
    return copies


def training_images(concept: Concept, n_images: int = 8, seed: int = 0, size: int = 64, zoomed_out: int = 0
                    ) -> list[tuple[Image.Image, np.ndarray, str]]:
    """A concept's training set: `n_images` rendered scenes (`concept_scenes`), then `zoomed_out` copies of them
    made small and moved (`zoomed_out_scenes`, `render.moved_object`); per image its RGB image, bool mask and
    caption with `PLACEHOLDER` for the concept."""
    scenes = concept_scenes(concept, n_images, seed)
    rendered = [render_with_masks(scene, size) for scene in scenes]
    items = [(image, masks[0], caption(scene, {0: PLACEHOLDER})) for scene, (image, masks) in zip(scenes, rendered)]
    for source, scene in zoomed_out_scenes(concept, scenes, zoomed_out, seed):
        image, mask = moved_object(rendered[source][0], rendered[source][1][0], scenes[source].objects[0],
                                   scene.objects[0], scene.background)
        items.append((image, mask, caption(scene, {0: PLACEHOLDER})))
    return items


def write_concept_folder(concept: Concept, folder: str | os.PathLike, n_images: int = 8, seed: int = 0,
                         size: int = 64, zoomed_out: int = 0) -> ConceptFolder:
    """Write a concept folder in the format `mixofshow.data.scan_concept_folder` reads.

    Layout: `folder/images/NN.png` with `NN.txt` captions containing `<TOK>` (e.g. "a <TOK> with a hat on the
    left, beige background"), `folder/masks/NN.png` (white = the concept), and `folder/concept.json` (name, words,
    initialisers, class word). The folder is written next to its final place and renamed into it; an existing
    folder is replaced.

    Args:
        concept: The concept.
        folder: The output folder.
        n_images: How many rendered images, 1 to 100 (6-10 is typical for ED-LoRA).
        seed: Seeds the variations; the same seed gives the same files.
        size: Image side in pixels.
        zoomed_out: How many small, moved copies of the rendered images to add (`training_images`).

    Returns:
        A `ConceptFolder` with the paths.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    items = training_images(concept, n_images, seed, size, zoomed_out)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (temporary / "images").mkdir()
        (temporary / "masks").mkdir()
        for i, (image, mask, text) in enumerate(items):
            image.save(temporary / "images" / f"{i:02d}.png")
            (temporary / "images" / f"{i:02d}.txt").write_text(text + "\n", encoding="utf-8")
            Image.fromarray(mask.astype(np.uint8) * 255).save(temporary / "masks" / f"{i:02d}.png")
        info = {**asdict(concept), "words": list(concept.words), "initializers": list(concept.initializers)}
        (temporary / "concept.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return ConceptFolder(folder, folder / "images", folder / "masks", concept)
