"""`mixofshow demo`: the whole Mix-of-Show mission on the bundled toy world, scored, as one HTML report.

Tunes three toy concepts with ED-LoRA, fuses them with weight and gradient fusion, samples each concept from its own
model and from each fused model plus one three-region composition (and its ceiling: each region's object alone from
its concept's own model), scores every image with the toy world's attribute classifier
(`mixofshow.toyworld.evaluate`), and writes DIR/index.html with the image grids (PNG files beside it) and the metric
table (also in DIR/metrics.json). Nothing is downloaded.

    mixofshow demo --out outputs/demo                          # the bundled toy model, a few minutes on 2 CPU cores
    mixofshow demo --out /tmp/demo --fast --base /tmp/toyworld  # a few steps at tiny sizes: checks it end to end

The tuning, fusion and sampling helpers here are also what `benchmarks/quality.py` runs.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .config import load_fuse_config, load_train_config
from .errors import MixOfShowError
from .fusion.fuse import fuse
from .models import load_base_components
from .pipelines import MixOfShowPipeline
from .pipelines.detail import RegionDetail, detail_regions
from .pipelines.regional import RegionPrompts, SpatialCondition
from .tokenizer import load_clip_tokenizer
from .toyworld.classifier import CLASSIFIER_FILE, load_classifier
from .toyworld.concepts import Concept, check_first_word, get_concept, write_concept_folder
from .toyworld.evaluate import (
    METRICS,
    ObjectScore,
    Target,
    binding_summary,
    box_pixels,
    composition_target,
    concept_targets,
    random_targets,
    score_images,
    summarize,
)
from .toyworld.models import toyworld_asset_folder, vae_factor
from .toyworld.render import Scene, nearest_place, object_geometry
from .toyworld.sketch import sketch_tensor
from .train import train

logger = logging.getLogger(__name__)

REPORT_FILE = "index.html"
METRICS_FILE = "metrics.json"
# The composition row that is its ceiling: each region's object drawn alone by its concept's own model
REGIONS_ALONE = "own models, each region alone"
# The columns of the report's tables
TABLE_METRICS = ("identity", "identity_strict", "identity_p", "shape", "colour", "background", "position")


@dataclass(frozen=True)
class ToyTuning:
    """How a toy concept is tuned. The toy model is ~100x smaller than SD1.5, so its LoRA learning rates are higher.
    The embeddings learn at 3e-3: the more of a concept its embeddings carry, the less its LoRA has to (session 6: six
    concepts kept 1.0 of the own models' identity at 3e-3, 0.51 at 1e-4, single unseeded draws). Over three tuning
    seeds, six concepts fused by gradient fusion kept 0.60 [0.25, 0.88] with the UNet LoRA at 2e-3 and 0.76 [0.62,
    1.01] at 5e-4, with more absolute identity and better three-region binding too: the UNet LoRA learns 6x slower
    than the embeddings (the official recipe: 10x). With embeddings at 1e-2 every concept is drawn in fragments.
    The first concept word starts random, as in the official recipe: starting it from the concept's colour word made
    the own models draw the right colour more often (66% against 51%, three seeds, n = 3) but fusion kept no more
    (0.72 of identity at n = 6 against 0.79). Eight zoomed-out copies (the concept small at every place, cut from the
    rendered images) and 600 steps instead of 400: over six tuning seeds, three-region binding after gradient fusion
    rose from 34% to 57% (every seed higher; on seeds 0-2 its ceiling, each region's object alone from its own model,
    from 44% to 80%), while identity kept at n = 6 moved within the noise (0.84 against 0.86). Pivotal tuning, 200
    embedding-only steps before 600 joint ones: over six tuning seeds (four statistics prompts), identity kept at
    n = 6 rose from 0.95 to 1.04 [0.89, 1.21], the fused model's identity from 39% to 46%, and three-region binding
    from 59% to 66% (lowest seed 60%, was 35%). Measurements: benchmarks/results/ (sessions 6-10, 14 and 16)."""

    mode: str = field(default="edlora", metadata={"help": "edlora, or lora (one embedding per word, the baseline)"})
    steps: int = field(default=800, metadata={"help": "optimizer steps per concept"})
    batch_size: int = field(default=4, metadata={"help": "images per step"})
    images: int = field(default=8, metadata={"help": "rendered training images per concept"})
    zoomed_out: int = field(default=8, metadata={"help": "small, moved copies of the rendered images added to the "
                                                        "training set (toyworld.concepts.training_images)"})
    lr_embedding: float = field(default=3e-3, metadata={"help": "learning rate of the concept embeddings"})
    embedding_norm_limit: float = field(default=0.55, metadata={"help": "freeze the concept embeddings once their "
                                                                         "mean norm reaches this (0 = never)"})
    embedding_only_steps: int = field(default=200, metadata={"help": "first steps (of `steps`) in which only the "
                                                                     "embeddings learn (TrainConfig; pivotal tuning)"})
    regional_share: float = field(default=0.0, metadata={"help": "share of steps with the concept words on a box "
                                                                 "around the subject only (TrainConfig)"})
    lr_text_encoder: float = field(default=3e-4, metadata={"help": "learning rate of the text-encoder LoRA"})
    lr_unet: float = field(default=5e-4, metadata={"help": "learning rate of the UNet LoRA"})
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    unet_lora_layers: str = field(default="attention", metadata={"help": "UNet layers with LoRA: attention, "
                                                                        "cross_attention or attention_ff "
                                                                        "(TrainConfig)"})
    first_word: str = field(default="random", metadata={"help": "initialiser of the first concept word: random "
                                                                 "(official) or colour (the concept's colour word)"})
    seed: int = field(default=0, metadata={"help": "seeds the rendered images and the tuning"})

    def __post_init__(self) -> None:
        check_first_word(self.first_word)
        if not 0 <= self.embedding_only_steps < self.steps:
            raise ValueError(f"embedding_only_steps {self.embedding_only_steps!r} must be within [0, steps "
                             f"{self.steps}): the LoRAs need steps of their own.")


@dataclass(frozen=True)
class DemoConfig:
    """Everything `run_demo` does; the defaults are the full run, `DemoConfig.fast` the seconds-long check."""

    out: str = field(metadata={"help": "output folder: index.html, metrics.json, PNG grids, concepts, fused models"})
    base: str | None = field(default=None, metadata={"help": "toy-world model folder (default: the bundled one)"})
    concepts: tuple[str, ...] = field(default=("pip", "nova", "moss"), metadata={"help": "three toy concepts"})
    tuning: ToyTuning = field(default=ToyTuning(), metadata={"help": "how each concept is tuned"})
    methods: tuple[str, ...] = field(default=("weight", "gradient"), metadata={"help": "fusion methods"})
    prompts_per_concept: int = field(default=3, metadata={"help": "single-concept prompts per concept"})
    samples_per_prompt: int = field(default=4, metadata={"help": "images per prompt (fixed seeds, same for all "
                                                                "models)"})
    composition_samples: int = field(default=8, metadata={"help": "images of the three-region composition"})
    base_prompts: int = field(default=24, metadata={"help": "random base-world captions to check the base model "
                                                           "with (0: skip)"})
    steps: int = field(default=25, metadata={"help": "sampling steps"})
    guidance: float = field(default=5.0, metadata={"help": "classifier-free guidance"})
    fusion_steps: int = field(default=20, metadata={"help": "steps of each concept's sampling run in gradient "
                                                           "fusion"})
    seed: int = field(default=0, metadata={"help": "seeds the sampling noise"})
    # Off by default: with the toy default's attention-only concepts the pass lowers binding (session 19)
    detail_strength: float = field(default=0.0, metadata={"help": "also show the compositions after a region detail "
                                                                  "pass of this strength (0: not)"})

    def __post_init__(self) -> None:
        if not 0 <= self.detail_strength <= 1:
            raise ValueError(f"detail_strength {self.detail_strength!r} must be from 0 (no detail pass) to 1.")
        if len(self.concepts) != 3:
            raise ValueError(f"concepts {self.concepts!r}: the demo tunes exactly three concepts.")
        for name in self.concepts:
            get_concept(name)
        for name in ("prompts_per_concept", "samples_per_prompt", "composition_samples", "steps", "fusion_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be at least 1.")
        if self.base_prompts < 0:
            raise ValueError(f"base_prompts {self.base_prompts!r} must not be negative.")

    @classmethod
    def fast(cls, out: str, **overrides) -> DemoConfig:
        """A few steps at tiny sizes: every stage runs, in seconds (the numbers mean nothing)."""
        values = {"tuning": ToyTuning(steps=2, batch_size=1, images=2, embedding_only_steps=1),
                  "prompts_per_concept": 1, "samples_per_prompt": 1, "composition_samples": 1, "base_prompts": 2,
                  "steps": 2, "fusion_steps": 2}
        values.update(overrides)
        return cls(out=out, **values)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (also used by benchmarks/quality.py).


def load_toy_world(base: str | Path | None = None) -> tuple[Path, dict, torch.nn.Module]:
    """The toy base model's folder, its components (float32, CPU) and its attribute classifier.

    Args:
        base: A folder written by `scripts/train_toyworld.py`; None for the one bundled with the package.
    """
    folder = Path(base) if base is not None else toyworld_asset_folder()
    if not (folder / "model_index.json").is_file():
        hint = ("the bundled toy model is not shipped with this copy of the package; train one with `python "
                "scripts/train_toyworld.py --out DIR` and pass --base DIR") if base is None else (
            "give a folder written by scripts/train_toyworld.py")
        raise MixOfShowError(f"{folder}: no toy-world model here (no model_index.json); {hint}.")
    if not (folder / CLASSIFIER_FILE).is_file():
        raise MixOfShowError(f"{folder}: no {CLASSIFIER_FILE} next to the model; give a folder written by "
                             "scripts/train_toyworld.py.")
    return folder, load_base_components(folder), load_classifier(folder / CLASSIFIER_FILE)


def image_size(components: dict) -> int:
    """The side of the images the base model makes (UNet sample size times the VAE's downsampling)."""
    return components["unet"].config.sample_size * vae_factor(components["vae"])


def fresh_components(components: dict) -> dict:
    """A private copy of toy base components: the models deep-copied, a new tokenizer.

    The toy world's tokenizer is the CLIP tokenizer shipped with the package, so a new one is read from there (much
    faster than deep-copying 49408 entries); a tokenizer that is not that one is deep-copied.
    """
    models = {k: copy.deepcopy(components[k]) for k in ("unet", "vae", "text_encoder", "scheduler")}
    tokenizer, shipped = components["tokenizer"], load_clip_tokenizer()
    probe = "a <pip1> red circle with a hat on the left, navy background"
    same = len(tokenizer) == len(shipped) and tokenizer(probe).input_ids == shipped(probe).input_ids
    return {**models, "tokenizer": shipped if same else copy.deepcopy(tokenizer)}


def tune_concept(concept: Concept, base: str | Path, components: dict, work: str | Path, tuning: ToyTuning,
                 progress: bool = True) -> Path:
    """Render a concept's training folder and tune it (ED-LoRA or plain LoRA) on a copy of the base components.

    Args:
        concept: The toy concept.
        base: The base model's folder (recorded in the concept file).
        components: Loaded base components (left unchanged).
        work: Folder for the data (`work/data/<name>`) and the concept file (`work/<name>.<mode>.safetensors`).
        tuning: Steps, batch size, learning rates, mode.
        progress: Show the training progress bar.

    Returns:
        The concept file.
    """
    work = Path(work)
    folder = write_concept_folder(concept, work / "data" / concept.name, tuning.images, tuning.seed,
                                  image_size(components), tuning.zoomed_out)
    config = load_train_config(
        None, base=str(base), data=str(folder.images), masks=str(folder.masks),
        out=str(work / f"{concept.name}.{tuning.mode}.safetensors"), words=list(concept.words),
        init=list(concept.initializers_from(tuning.first_word)), mode=tuning.mode, steps=tuning.steps,
        batch_size=tuning.batch_size,
        resolution=image_size(components), rank=tuning.rank, alpha=float(tuning.rank),
        unet_lora_layers=tuning.unet_lora_layers, lr_embedding=tuning.lr_embedding,
        lr_text_encoder=tuning.lr_text_encoder, lr_unet=tuning.lr_unet,
        embedding_norm_limit=tuning.embedding_norm_limit, embedding_only_steps=tuning.embedding_only_steps,
        regional_share=tuning.regional_share,
        flip_p=0.0,  # captions name the position: a flipped image would contradict its caption
        validation_steps=0, seed=tuning.seed)
    return train(config, components=fresh_components(components), progress=progress)


# Eigen-directions of a layer's Gram below this share of its largest eigenvalue stay at weight fusion. The library's
# default (1e-6) fits nearly every direction the few statistics prompts excite; in the toy world that over-fits them:
# at 1e-3 the fused models follow other prompts as well as the own models do and keep more identity
# (benchmarks/results/2026-11-26-session6-toyworld.md).
TOY_FUSION_RCOND = 1e-3

# Every concept's UNet LoRA enters the toy fusion at 1.5 times its tuned strength (official `unet_alpha`, there 1.0):
# where six concepts share a layer's inputs, the fused change is a compromise that draws each concept more weakly
# than its own model. At 1.5, gradient fusion keeps 0.91 of the own models' identity at n = 6 instead of 0.79 (more
# on each of three tuning seeds, and 0.79 instead of 0.63 on a held-out fourth) for 0.96 of their prompt fidelity;
# scaling the fused change by 2.0 overshoots (0.78) (benchmarks/results/2026-12-07-session12-toyworld.md). Over six
# tuning seeds and two statistics prompts it keeps 0.86 with session 13's tuning, 0.84 with the zoomed-out copies
# (session 14's results). With one or two concepts there is little to compromise on and the boost overshoots: one
# concept fused at 1.5 kept 0.76 [0.26, 1.05] of its own model's identity over three seeds (at 1.0: exactly 1), two
# kept 0.98 [0.70, 1.20] by gradient fusion (at 1.0: 1.04 [1.02, 1.06]) (session 17's results). So the boost starts
# at `TOY_FUSION_BOOST_FROM` concepts.
TOY_FUSION_UNET_SCALE = 1.5
TOY_FUSION_BOOST_FROM = 3


def toy_fusion_unet_scale(n_concepts: int) -> float:
    """Every concept's UNet LoRA scale in a toy fusion of `n_concepts`: `TOY_FUSION_UNET_SCALE` from
    `TOY_FUSION_BOOST_FROM` concepts on, else the tuned strength (1.0)."""
    return TOY_FUSION_UNET_SCALE if n_concepts >= TOY_FUSION_BOOST_FROM else 1.0

# Prompts of each concept's statistics sampling run, whose UNet inputs gradient fusion fits (the official code uses
# one); the toy fusion uses the first `TOY_FUSION_PROMPTS`. With the zoomed-out copies the concepts are tuned small
# too, and the first four (two of them small, none a slot of the three-region layout) instead of the first two raised
# identity kept at n = 6 over six tuning seeds from 0.836 to 0.945 (pooled 0.852 to 0.910; both halves of the seeds
# higher, most of the mean's gain on one seed), at n = 3 from 0.911 to 0.933, three-region binding from 57.3% to 58.7%
# (benchmarks/results/2026-12-07-session15-toyworld.md). All eight, with session 13's tuning, raised binding (34% to
# 42%) but cut identity kept at n = 3 (0.90 to 0.76) (session 13).
TOY_STATISTICS_PROMPTS = (
    "a {} in the center, white background",
    "a {} on the left, beige background",
    "a small {} at the top right, white background",
    "a small {} at the bottom left, navy background",
    "a {} on the right, gray background",
    "a large {} at the top, mint background",
    "a {} with a hat at the bottom right, lavender background",
    "a large {} on the left, gray background",
)
TOY_FUSION_PROMPTS = 4

# Weight of the statistics rows away from the concept (`FuseConfig.background_weight`); 1.0: all rows alike. At 0.1,
# with feed-forward LoRA concepts, binding after the detail pass rose from 83% to 85% over three tuning seeds but
# identity kept at n = 6 did not (0.88 against 0.90, one seed), and the default concepts were not measured with it
# (benchmarks/results/2026-12-07-session20-toyworld.md): off.
TOY_FUSION_BACKGROUND_WEIGHT = 1.0
# How that weight follows the concept words' attention (`FuseConfig.subject_map`), when it is below 1. With 0.1 the
# Otsu mask kept the most identity at n = 6 (0.934 against 0.899 plain, one seed) but no more at n = 3 and no more
# binding (benchmarks/results/2026-12-08-session21-toyworld.md).
TOY_FUSION_SUBJECT_MAP = "linear"


def fuse_concepts(files: Sequence[str | Path], base: str | Path, components: dict, out: str | Path, method: str,
                  sampling_steps: int = 20, guidance: float = 5.0, progress: bool = True,
                  rcond: float = TOY_FUSION_RCOND, unet_scale: float | None = None,
                  sampling_templates: Sequence[str] = TOY_STATISTICS_PROMPTS[:TOY_FUSION_PROMPTS],
                  background_weight: float = TOY_FUSION_BACKGROUND_WEIGHT,
                  subject_map: str = TOY_FUSION_SUBJECT_MAP) -> Path:
    """Fuse concept files into one model folder with toy-world prompts for the statistics.

    Args:
        files: Concept files trained on `base`.
        base: The base model's folder.
        components: Loaded base components (left unchanged).
        out: The fused model folder (replaced if it exists).
        method: weight, gradient, zip or lbfgs.
        sampling_steps: Steps of each concept's sampling run (gradient, zip, lbfgs).
        guidance: Guidance of that run (as the samples will be drawn).
        progress: Show progress bars.
        rcond: Relative eigenvalue cutoff of the gradient-fusion solve (`FuseConfig.rcond`).
        unet_scale: Every concept's UNet LoRA scale in the fusion (`ConceptSpec.unet_scale`, official `unet_alpha`);
            None: `toy_fusion_unet_scale` of the number of files.
        sampling_templates: Prompts of each concept's statistics sampling run, `{}` = the concept words.
        background_weight: Weight of the statistics rows away from the concept (`FuseConfig.background_weight`).
        subject_map: How the concept words' attention weights those rows (`FuseConfig.subject_map`).
    """
    size = image_size(components)
    unet_scale = toy_fusion_unet_scale(len(files)) if unet_scale is None else unet_scale
    config = load_fuse_config(
        None, concepts=[{"path": str(f), "unet_scale": unet_scale} for f in files], base=str(base), out=str(out),
        method=method, overwrite=True,
        text_templates=("a {} in the center, white background", "{}"),
        sampling_templates=tuple(sampling_templates),
        sampling_steps=sampling_steps, sampling_guidance=guidance, sampling_size=size, rcond=rcond,
        background_weight=background_weight, subject_map=subject_map)
    return fuse(config, components=fresh_components(components), progress=progress, copy_components=False)


def concept_pipeline(components: dict, files: Sequence[str | Path]) -> MixOfShowPipeline:
    """Base components (copied) with concept files loaded at scale 1: one file is that concept's own model."""
    pipe = MixOfShowPipeline(**fresh_components(components))
    for path in files:
        pipe.load_concept(path, scale=1.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fused_pipeline(folder: str | Path) -> MixOfShowPipeline:
    """A fused model folder as a pipeline (its concept words included)."""
    pipe = MixOfShowPipeline.from_base(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(pipe: MixOfShowPipeline, seed: int) -> torch.Tensor:
    """The initial latents of one image, (C, h, w), from a CPU generator seeded with `seed`."""
    size = pipe.unet.config.sample_size
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((pipe.unet.config.in_channels, size, size), generator=generator)


def region_prompts(target: Target, size: int, isolate: bool = False) -> RegionPrompts:
    """A composition target's objects as regions: each its own prompt, box mask and the empty negative prompt
    (`isolate`: the regions kept apart in self-attention too)."""
    masks = torch.zeros(len(target.regions), size, size)
    for index, box in enumerate(target.regions):
        x0, y0, x1, y1 = box_pixels(box, size)
        masks[index, y0:y1, x0:x1] = 1.0
    prompts = [target.region_prompt(i) for i in range(len(target.regions))]
    return RegionPrompts(prompts, [""] * len(prompts), masks, isolate=isolate)


def region_details(target: Target) -> list[RegionDetail]:
    """A composition target's regions as detail passes: each object's column band, redrawn from the square window
    around the object in which it appears at medium size (a small object zoomed in about 1.45x; a medium or large
    one: the whole image), with the prompt that describes what the window shows in the world's own words: the
    object, medium-sized, at the column and row nearest to where it sits in the window."""
    details = []
    for index, (obj, box) in enumerate(zip(target.scene.objects, target.regions)):
        x, y, radius = object_geometry(obj)
        side = min(1.0, radius / object_geometry(dataclasses.replace(obj, size="medium"))[2])
        left = min(max(x - side / 2, 0.0), 1.0 - side)
        top = min(max(y - side / 2, 0.0), 1.0 - side)
        column, row = nearest_place((x - left) / side, (y - top) / side)
        close_up = dataclasses.replace(obj, column=column, row=row, size="medium", offset=(0.0, 0.0))
        prompt = Target(Scene(target.scene.background, (close_up,)), (target.concepts[index],)).prompt()
        details.append(RegionDetail(box, prompt, window=(left, top, left + side, top + side)))
    return details


@dataclass(frozen=True)
class Sketch:
    """A sketch T2I-Adapter (`toyworld.sketch`) and its weight: each target is drawn under its scene's outlines."""

    adapter: torch.nn.Module
    weight: float = 1.0

    def condition(self, target: Target, size: int) -> SpatialCondition:
        return SpatialCondition(self.adapter, sketch_tensor(target.scene, size), self.weight, "sketch")


def sample_targets(pipe: MixOfShowPipeline, targets: Sequence[Target], samples: int, steps: int, guidance: float,
                   seed: int = 0, regional: bool = False, isolate: bool = False, batch_size: int = 16,
                   progress: bool = True, desc: str = "sampling", sketch: Sketch | None = None,
                   detail_strength: float = 0.0) -> list[list[Image.Image]]:
    """`samples` images of each target's prompt; image k of target i starts from the noise of seed
    `seed + 1000 i + k`, whatever the model, so models are compared on the same noise.

    Args:
        pipe: The model.
        targets: What to draw.
        samples: Images per target.
        steps: Sampling steps.
        guidance: Classifier-free guidance.
        seed: Offsets every noise seed.
        regional: Sample each target as a regional layout (one region per object, see `region_prompts`).
        isolate: With `regional`, keep the regions apart in self-attention too.
        batch_size: Images per pipeline call.
        progress: Show a progress bar.
        desc: Its label.
        sketch: Draw every image under its target's sketch (`Sketch`), as regionally controllable sampling does
            with a spatial condition.
        detail_strength: With `regional`, finish every region with a detail pass of this strength
            (`region_details`, `detail_regions`; its noise from the chunk's first seed); 0 = none.

    Returns:
        Per target, its images.
    """
    jobs = [(i, k) for i in range(len(targets)) for k in range(samples)]
    # One pipeline call holds any prompts without regions or sketch, or the images of one target with its own.
    per_target = regional or sketch is not None
    groups = [[job for job in jobs if job[0] == i] for i in range(len(targets))] if per_target else [jobs]
    chunks = [group[s:s + batch_size] for group in groups for s in range(0, len(group), batch_size)]
    images: list[list[Image.Image]] = [[] for _ in targets]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with tqdm(total=len(jobs), desc=desc, disable=not progress, unit="image") as bar:
        for chunk in chunks:
            prompts = [targets[i].prompt() for i, _ in chunk]
            latents = torch.stack([noise(pipe, seed + 1000 * i + k) for i, k in chunk])
            regions = region_prompts(targets[chunk[0][0]], size, isolate) if regional else None
            conditions = [sketch.condition(targets[chunk[0][0]], size)] if sketch is not None else []
            out = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                       latents=latents, progress=False, regions=regions, conditions=conditions).images
            if regional and detail_strength > 0:
                i, k = chunk[0]
                out = detail_regions(pipe, out, region_details(targets[i]), detail_strength, steps, guidance,
                                     seed=seed + 1000 * i + k, progress=False)
            for (i, _), image in zip(chunk, out):
                images[i].append(image)
            bar.update(len(chunk))
    return images


def sample_regions_alone(pipes: Sequence[MixOfShowPipeline], composition: Target, samples: int, **sampling
                         ) -> tuple[list[Target], list[list[Image.Image]]]:
    """Each object of `composition` alone (`Target.part`), drawn by `pipes[i]` from the same noise as the
    composition's images. With each concept's own model: the ceiling of regional binding; with the fused model
    for every part: what the fused model reaches before regions are composed.

    Returns:
        The parts, and per part its images (`sample_targets`' output, ready for `score_samples`).
    """
    parts = [composition.part(index) for index in range(len(composition.scene.objects))]
    images = [sample_targets(pipe, [part], samples, desc=f"{part.concepts[0]}, its region alone",
                             **sampling)[0] for pipe, part in zip(pipes, parts)]
    return parts, images


def score_samples(classifier, images: Sequence[Sequence[Image.Image]], targets: Sequence[Target]
                  ) -> list[list[ObjectScore]]:
    """`score_images` on `sample_targets`' output; per target, the scores of its images' objects."""
    flat_images = [image for group in images for image in group]
    flat_targets = [t for t, group in zip(targets, images) for _ in group]
    scores = score_images(classifier, flat_images, flat_targets)
    owner = [i for i, group in enumerate(images) for _ in group]
    grouped: list[list[ObjectScore]] = [[] for _ in targets]
    for score in scores:
        grouped[owner[score.image]].append(score)
    return grouped


# ---------------------------------------------------------------------------------------------------------------
# Pictures.


def annotated_grid(rows: Sequence[Sequence[Image.Image]], scores: Sequence[Sequence[ObjectScore]] | None = None,
                   scale: int = 2, gap: int = 2) -> Image.Image:
    """Images in rows (upscaled `scale` times), each found object outlined: green when its identity is right, red
    when not."""
    side = max(image.width for row in rows for image in row) * scale
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * (side + gap) + gap, len(rows) * (side + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        per_image: dict[int, list[ObjectScore]] = {}
        for score in (scores[r] if scores else []):
            per_image.setdefault(score.image, []).append(score)
        ordered = sorted(per_image)  # score.image numbers the row's images in order, from any offset
        for c, image in enumerate(row):
            x, y = gap + c * (side + gap), gap + r * (side + gap)
            grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
            for score in per_image.get(ordered[c], []) if c < len(ordered) else []:
                if score.box is None:
                    continue
                x0, y0, x1, y1 = (v * side for v in score.box)
                colour = (40, 200, 60) if score.correct["identity"] else (230, 40, 40)
                draw.rectangle((x + x0, y + y0, x + x1 - 1, y + y1 - 1), outline=colour)
    return grid


# ---------------------------------------------------------------------------------------------------------------
# The demo.


@dataclass
class Evaluation:
    """One model's samples of some targets, their scores and where their grid was written."""

    model: str
    targets: list[Target]
    images: list[list[Image.Image]]
    scores: list[list[ObjectScore]]
    grid: str = ""

    def summary(self, concept: str | None = None) -> dict[str, float]:
        picked = [s for t, group in zip(self.targets, self.scores) for s in group
                  if concept is None or t.concepts[s.index] == concept]
        return summarize(picked)


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    """Log a stage and record its seconds in `timings`."""
    logger.info("demo: %s", name)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def run_demo(config: DemoConfig, progress: bool = True) -> Path:
    """Tune, fuse, sample, score and report (see the module docstring).

    Args:
        config: What to run.
        progress: Show progress bars.

    Returns:
        The report file, `config.out/index.html`.
    """
    started = time.perf_counter()
    out = Path(config.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    sampling = {"steps": config.steps, "guidance": config.guidance, "seed": config.seed, "progress": progress}

    # 1. The toy base model and its classifier
    with _stage("load the toy world", timings):
        base, components, classifier = load_toy_world(config.base)
        concepts = [get_concept(name) for name in config.concepts]

    # 2. Does the base model follow prompts? (random base-world captions)
    base_eval = None
    if config.base_prompts:
        with _stage("base model", timings):
            targets = random_targets(config.base_prompts, config.seed)
            images = sample_targets(concept_pipeline(components, []), targets, 1, desc="base model", **sampling)
            base_eval = Evaluation("base model", targets, images, score_samples(classifier, images, targets))

    # 3. One ED-LoRA per concept, each on its own copy of the base model (as separate users would)
    files = []
    for concept in concepts:
        with _stage(f"tune {concept.name}", timings):
            files.append(tune_concept(concept, base, components, out / "concepts", config.tuning, progress))

    # 4. Fuse them, once per method
    fused = {}
    for method in config.methods:
        with _stage(f"{method} fusion", timings):
            fused[method] = fuse_concepts(files, base, components, out / "fused" / method, method,
                                          config.fusion_steps, config.guidance, progress)

    # 5. Single-concept samples: each concept's own model, then every fused model, on the same noise
    per_concept = [concept_targets(c, config.prompts_per_concept, config.seed) for c in concepts]
    targets = [t for mine in per_concept for t in mine]
    models = {"own model": [concept_pipeline(components, [path]) for path in files]}
    models.update({f"{method} fusion": [fused_pipeline(folder)] * len(concepts) for method, folder in fused.items()})
    single: list[Evaluation] = []
    with _stage("single-concept samples", timings):
        for model, pipes in models.items():
            images = []
            for concept, pipe, mine in zip(concepts, pipes, per_concept):
                images += sample_targets(pipe, mine, config.samples_per_prompt, desc=f"{model}: {concept.name}",
                                         **sampling)
            single.append(Evaluation(model, targets, images, score_samples(classifier, images, targets)))

    # 6. The three-region composition from every fused model, after its ceiling: each region's object alone from
    # its concept's own model (the same size, place, background and noise)
    composition = [composition_target(concepts)]
    regional: list[Evaluation] = []
    with _stage("three-region composition", timings):
        alone, images = sample_regions_alone(models["own model"], composition[0], config.composition_samples,
                                             **sampling)
        regional.append(Evaluation(REGIONS_ALONE, alone, images, score_samples(classifier, images, alone)))
        for method, folder in fused.items():
            pipe = fused_pipeline(folder)
            images = sample_targets(pipe, composition, config.composition_samples, regional=True,
                                    desc=f"{method} fusion, regions", **sampling)
            regional.append(Evaluation(f"{method} fusion", composition, images,
                                       score_samples(classifier, images, composition)))
            if config.detail_strength > 0:
                images = [detail_regions(pipe, images[0], region_details(composition[0]), config.detail_strength,
                                         config.steps, config.guidance, seed=config.seed, progress=progress)]
                regional.append(Evaluation(f"{method} fusion, detailed", composition, images,
                                           score_samples(classifier, images, composition)))

    # 7. The report
    timings["total"] = time.perf_counter() - started
    report = write_report(out, config, base, concepts, base_eval, single, regional, timings)
    logger.info("demo: wrote %s in %.0f s", report, timings["total"])
    return report


# ---------------------------------------------------------------------------------------------------------------
# The report.

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em}td,th{border:1px solid #bbb;padding:0.25em 0.6em;text-align:right}
th:first-child,td:first-child{text-align:left}img{image-rendering:pixelated;border:1px solid #ddd}
.note{color:#555;font-size:0.92em}code{background:#f3f3f3;padding:0 0.2em}"""


def _without_nan(value):
    """`value` with every NaN (an undefined metric) as None, so that metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _save_grid(out: Path, name: str, evaluation: Evaluation, scale: int) -> str:
    path = out / "images" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    annotated_grid(evaluation.images, evaluation.scores, scale).save(path)
    evaluation.grid = str(path.relative_to(out))
    return evaluation.grid


def _training_strip(out: Path, concept: Concept) -> str:
    folder = out / "concepts" / "data" / concept.name / "images"
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    path = out / "images" / f"data-{concept.name}.png"
    annotated_grid([images], None, 2).save(path)
    return str(path.relative_to(out))


def write_report(out: Path, config: DemoConfig, base: Path, concepts: Sequence[Concept],
                 base_eval: Evaluation | None, single: Sequence[Evaluation], regional: Sequence[Evaluation],
                 timings: dict[str, float]) -> Path:
    """Write `out/index.html` (tables and grids) and `out/metrics.json` (the same numbers)."""
    metrics: dict = {"config": dataclasses.asdict(config), "base": str(base), "seconds": timings,
                     "single_concept": {}, "per_concept": {}, "composition": {}}
    intro = (f"<h1>Mix-of-Show on the toy world</h1><p class=note>Base model <code>{html.escape(str(base))}</code>; "
             f"{len(concepts)} concepts tuned with {config.tuning.mode} ({config.tuning.steps} steps, batch "
             f"{config.tuning.batch_size}, {config.tuning.images} images each); fused with "
             f"{', '.join(config.methods)} fusion; {config.steps} sampling steps, guidance {config.guidance:g}; "
             f"{timings['total']:.0f} s in all.</p>")
    parts = [intro]

    # The concepts and their training data
    parts.append("<h2>Concepts</h2>")
    parts.append(f"<p>Training images: {config.tuning.images} rendered, then {config.tuning.zoomed_out} zoomed-out "
                 "copies of them (an object cut out, shrunk to small size and moved, with its caption rewritten)."
                 "</p>")
    for concept in concepts:
        strip = _training_strip(out, concept)
        parts.append(f"<p><b>{html.escape(' '.join(concept.words))}</b> — {html.escape(concept.description)} "
                     f"(class word <i>{concept.class_word}</i>)<br><img src='{strip}'></p>")

    # Single-concept identity and prompt fidelity, relative to each concept's own model
    own = single[0].summary()
    rows = []
    for evaluation in single:
        summary = evaluation.summary()
        metrics["single_concept"][evaluation.model] = summary
        metrics["per_concept"][evaluation.model] = {c.name: evaluation.summary(c.name) for c in concepts}
        ratio = summary["identity"] / own["identity"] if own["identity"] else float("nan")
        rows.append([evaluation.model] + [_percent(summary[m]) for m in TABLE_METRICS] +
                    ["—" if math.isnan(ratio) else f"{ratio:.2f}x"])
    parts.append("<h2>Single-concept samples</h2><p class=note>Each concept alone, "
                 f"{config.prompts_per_concept} prompt(s) x {config.samples_per_prompt} image(s) per concept, the "
                 "same noise for every model. <i>identity</i>: the classifier's concept head names the concept (on "
                 "the object found in the image); <i>identity_strict</i>: that, in the concept's shape and colour "
                 "too; <i>identity_p</i>: the concept head's mean probability of the concept (soft); "
                 "<i>shape, colour</i>: the concept's class word and colour; "
                 "<i>background, position</i>: as the prompt asks. Share of objects right.</p>")
    parts.append(_table(["model", *TABLE_METRICS, "identity vs own model"], rows))
    header = ["concept"] + [e.model for e in single]
    parts.append("<p class=note>Identity per concept:</p>" + _table(header, [
        [html.escape(" ".join(c.words))] + [_percent(e.summary(c.name)["identity"]) for e in single]
        for c in concepts]))
    for evaluation in single:
        grid = _save_grid(out, "single-" + evaluation.model.replace(" ", "-"), evaluation, 2)
        prompts = "".join(f"<li><code>{html.escape(t.prompt())}</code></li>" for t in evaluation.targets)
        parts.append(f"<h3>{html.escape(evaluation.model)}</h3><img src='{grid}'><ol class=note>{prompts}</ol>")

    # Regional binding
    rows = []
    for evaluation in regional:
        flat = [s for group in evaluation.scores for s in group]
        binding = binding_summary(flat, [t for t, group in zip(evaluation.targets, evaluation.images)
                                         for _ in group])
        metrics["composition"][evaluation.model] = {**binding, **evaluation.summary()}
        rows.append([evaluation.model, _percent(binding["binding"]), _percent(binding["all_bound"]),
                     _percent(binding["swapped"]), _percent(evaluation.summary()["position"])])
    composed = [evaluation for evaluation in regional if evaluation.model != REGIONS_ALONE]
    if composed:
        target = composed[0].targets[0]
        parts.append("<h2>Three concepts, three regions</h2><p class=note>Global prompt "
                     f"<code>{html.escape(target.prompt())}</code>; each third of the image is a region with its own "
                     "prompt. <i>binding</i>: the region holds its own concept; <i>all bound</i>: every region of the "
                     "image does; <i>swapped</i>: a region holds another region's concept. The first row is the "
                     "ceiling: each region's object alone (same size, place, background and noise), drawn by its "
                     "concept's own model. <i>detailed</i>: the same images after a region detail pass (each region "
                     "redrawn from a window in which its object looks medium-sized, with that object's prompt "
                     f"alone, strength {config.detail_strength:g}).</p>")
        parts.append(_table(["model", "binding", "all bound", "swapped", "position"], rows))
        for evaluation in regional:
            grid = _save_grid(out, "regions-" + evaluation.model.replace(",", "").replace(" ", "-"), evaluation, 3)
            parts.append(f"<h3>{html.escape(evaluation.model)}</h3><img src='{grid}'>")

    # The base model
    if base_eval is not None:
        summary = base_eval.summary()
        metrics["base_model"] = summary
        grid = _save_grid(out, "base-model", base_eval, 2)
        parts.append("<h2>The base model</h2><p class=note>Random captions of the base world (no concepts), one "
                     "image each; every object scored in its column. Identity here: the classifier finds no concept "
                     "(as it should).</p>")
        columns = [m for m in METRICS[1:] if m != "identity_strict"]  # nothing to be strict about without concepts
        parts.append(_table(["", *columns], [["base model"] + [_percent(summary[m]) for m in columns]]))
        prompts = "".join(f"<li><code>{html.escape(t.prompt())}</code></li>" for t in base_eval.targets)
        parts.append(f"<img src='{grid}'><ol class=note>{prompts}</ol>")

    # Timings
    parts.append("<h2>Time</h2>" + _table(["stage", "seconds"], [[html.escape(k), f"{v:.1f}"]
                                                                  for k, v in timings.items()]))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>mixofshow demo</title><style>{_CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>\n")
    (out / METRICS_FILE).write_text(json.dumps(_without_nan(metrics), indent=1) + "\n")
    report = out / REPORT_FILE
    report.write_text(page, encoding="utf-8")
    return report


def summary_line(metrics_file: str | Path) -> str:
    """One line of the headline numbers of a demo's metrics.json (for the command line)."""
    metrics = json.loads(Path(metrics_file).read_text())
    parts = [f"{model}: identity {_percent(s['identity'])}" for model, s in metrics["single_concept"].items()]
    parts += [f"regions ({model}): binding {_percent(s['binding'])}" for model, s in metrics["composition"].items()]
    return "; ".join(parts)

