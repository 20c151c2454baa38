"""Quality of fusion on the toy world (issue 5): identity and prompt fidelity of fused models relative to each
concept's own model, and regional binding; our version of the paper's table.

For n concepts (the first n of --concepts; the default order puts look-alikes early: pip and rex are both circles,
nova and vega both stars), each fusion method (weight, gradient, zip) and each tuning mode (ED-LoRA, plain LoRA):

- single concept: every concept's prompts (--prompts positions/backgrounds x --samples fixed seeds, the same noise
  for every model) from its own model (the base plus its LoRA) and from the fused model, scored with the toy
  world's classifier (`mixofshow.toyworld.evaluate`): identity (the concept head names the concept), strict
  identity (that, in the concept's shape and colour too), shape, colour, background, position. The table gives
  each value and, for both identities and the mean of the four prompt-fidelity metrics, the ratio to the concepts'
  own models measured in the same run; identity also softly (identity p: the classifier's mean probability of the
  concept, continuous like CLIP similarity), with its ratio;
- regional binding, for n = 2 and 3: a layout with one region per concept (left/right or left/center/right), each
  region's object classified: the share of regions holding their own concept. Its ceiling, in the own-models row:
  each region's object alone (same size, place, background and noise) drawn by its concept's own model.

Goals (issue 5): gradient fusion keeps >= 95% of the own models' identity at n = 6; with 3 concepts, >= 90% of the
regions hold their own concept.

Run:
    python benchmarks/quality.py --base DIR --quick     # CPU: 2 concepts, a few steps, proves it runs (~minutes)
    python benchmarks/quality.py --base DIR             # the full table: n = 1, 2, 3, 6, 16 samples per prompt
    python benchmarks/quality.py                        # on the bundled toy model, once it is shipped
    python benchmarks/quality.py --base DIR --base-only # only the base model's prompt following (64 captions)
    python benchmarks/quality.py --seeds 0,1,2          # three tuning seeds: each row's mean and range

Concept files are kept in --work and reused by later runs with the same tuning settings and training images.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import time
from pathlib import Path

import torch

from mixofshow.concept_file import fingerprint
from mixofshow.demo import (
    TOY_FUSION_BACKGROUND_WEIGHT,
    TOY_FUSION_BOOST_FROM,
    TOY_FUSION_PROMPTS,
    TOY_FUSION_RCOND,
    TOY_FUSION_SUBJECT_MAP,
    TOY_FUSION_UNET_SCALE,
    TOY_STATISTICS_PROMPTS,
    Sketch,
    ToyTuning,
    concept_pipeline,
    fuse_concepts,
    fused_pipeline,
    image_size,
    load_toy_world,
    region_details,
    sample_regions_alone,
    sample_targets,
    score_samples,
    tune_concept,
)
from mixofshow.fusion.stats import SUBJECT_MAPS
from mixofshow.lora import UNET_TARGET_PATTERNS
from mixofshow.pipelines.detail import detail_regions
from mixofshow.toyworld.concepts import FIRST_WORDS, Concept, get_concept, training_images
from mixofshow.toyworld.evaluate import (
    HEADS,
    binding_summary,
    composition_target,
    concept_targets,
    random_targets,
    summarize,
)
from mixofshow.toyworld.render import ACCESSORIES, BACKGROUNDS, COLOURS, PATTERNS, SHAPES
from mixofshow.toyworld.sketch import load_sketch_adapter

FIDELITY = ("shape", "colour", "background", "position")
COLUMNS = ("identity", "identity_strict", "identity_p") + FIDELITY
IDENTITY_GOAL, BINDING_GOAL = 0.95, 0.90


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", default=None, help="toy-world folder (default: the bundled model)")
    parser.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mixofshow-quality"),
                        help="concept files, training data and fused models go here")
    parser.add_argument("--concepts", default="pip,rex,nova,vega,moss,tula", help="concepts, in order")
    parser.add_argument("--ns", default="1,2,3,6", help="how many concepts to fuse (the first n)")
    parser.add_argument("--methods", default="weight,gradient,zip", help="fusion methods")
    parser.add_argument("--modes", default="edlora,lora", help="tuning modes")
    parser.add_argument("--prompts", type=int, default=3, help="single-concept prompts per concept")
    parser.add_argument("--samples", type=int, default=16, help="images per prompt (and per layout)")
    parser.add_argument("--tune-steps", type=int, default=ToyTuning.steps, help="tuning steps per concept")
    parser.add_argument("--tune-batch", type=int, default=ToyTuning.batch_size, help="tuning batch size")
    parser.add_argument("--tune-rank", type=int, default=ToyTuning.rank, help="LoRA rank of the tuned concepts")
    parser.add_argument("--tune-unet-lora-layers", default=ToyTuning.unet_lora_layers,
                        choices=tuple(UNET_TARGET_PATTERNS), help="UNet layers with LoRA")
    parser.add_argument("--tune-lr-embedding", type=float, default=ToyTuning.lr_embedding,
                        help="learning rate of the concept embeddings")
    parser.add_argument("--tune-first-word", default=ToyTuning.first_word, choices=FIRST_WORDS,
                        help="initialiser of the first concept word")
    parser.add_argument("--tune-lr-unet", type=float, default=ToyTuning.lr_unet, help="learning rate of the UNet LoRA")
    parser.add_argument("--tune-lr-text-encoder", type=float, default=ToyTuning.lr_text_encoder,
                        help="learning rate of the text-encoder LoRA")
    parser.add_argument("--tune-images", type=int, default=ToyTuning.images,
                        help="rendered training images per concept")
    parser.add_argument("--tune-zoomed-out", type=int, default=ToyTuning.zoomed_out,
                        help="small, moved copies of the rendered images added to each training set")
    parser.add_argument("--tune-embedding-only-steps", type=int, default=ToyTuning.embedding_only_steps,
                        help="first tuning steps in which only the concept embeddings learn (pivotal tuning)")
    parser.add_argument("--tune-regional-share", type=float, default=ToyTuning.regional_share,
                        help="share of tuning steps with the concept words on a box around the subject only")
    parser.add_argument("--rcond", type=float, default=TOY_FUSION_RCOND,
                        help="eigenvalue cutoff of the gradient-fusion solve (relative to the largest)")
    parser.add_argument("--fusion-unet-scale", type=float, default=None,
                        help="every concept's UNet LoRA scale in the fusion (official `unet_alpha`; default: "
                             f"{TOY_FUSION_UNET_SCALE:g} from {TOY_FUSION_BOOST_FROM} concepts on, else 1)")
    parser.add_argument("--fusion-prompts", type=int, default=TOY_FUSION_PROMPTS,
                        choices=range(1, len(TOY_STATISTICS_PROMPTS) + 1), metavar="N",
                        help=f"prompts of each concept's statistics sampling run: the first N of the toy's "
                             f"{len(TOY_STATISTICS_PROMPTS)}")
    parser.add_argument("--fusion-background-weight", type=float, default=TOY_FUSION_BACKGROUND_WEIGHT,
                        help="weight of the statistics rows away from each concept (where its words are not "
                             "attended; `FuseConfig.background_weight`, 1: all rows alike)")
    parser.add_argument("--fusion-subject-map", choices=SUBJECT_MAPS, default=TOY_FUSION_SUBJECT_MAP,
                        help="how the attention weights those rows (`FuseConfig.subject_map`)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance")
    parser.add_argument("--fusion-steps", type=int, default=20, help="sampling steps of gradient/zip statistics")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tuning data and the sampling noise")
    parser.add_argument("--seeds", default=None,
                        help="several seeds, e.g. 0,1,2: each tunes, fuses and samples anew; the table then gives "
                             "each row's mean and its range over the seeds (default: --seed alone)")
    parser.add_argument("--base-prompts", type=int, default=64,
                        help="random base-world captions to check the base model's prompt following with (0: skip)")
    parser.add_argument("--base-only", action="store_true", help="only the base model's prompt following")
    parser.add_argument("--quick", action="store_true",
                        help="2 concepts, n = 1, 2, 1 prompt x 2 samples, 20 tuning steps, 10 sampling steps")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu or cuda (tuning runs where "
                                                        "accelerate puts it, the GPU whenever there is one)")
    parser.add_argument("--isolate-regions", action="store_true",
                        help="also sample every layout with its regions kept apart in self-attention "
                             "(`RegionPrompts.isolate`): the 'binding, isolated' column")
    parser.add_argument("--detail-strength", type=float, default=0.0,
                        help="also finish every layout with a region detail pass of this strength (each region "
                             "redrawn zoomed in with its own prompt, `detail_regions`): the 'binding, detailed' "
                             "column (0: off)")
    parser.add_argument("--sketch", action="store_true",
                        help="draw every layout, and each region's object alone, under its sketch through the toy "
                             "world's sketch T2I-Adapter (regionally controllable sampling with a spatial condition)")
    parser.add_argument("--sketch-weight", type=float, default=1.0, help="the sketch adapter's weight")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.concepts, args.ns, args.prompts, args.samples = "pip,rex", "1,2", 1, 2
        args.tune_steps, args.steps, args.fusion_steps = 20, 10, 5
    args.concepts = [get_concept(name) for name in args.concepts.split(",")]
    args.ns = sorted({int(n) for n in args.ns.split(",")})
    args.methods = args.methods.split(",")
    args.modes = args.modes.split(",")
    try:
        args.seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be whole numbers separated by commas, e.g. 0,1,2")
    if args.ns[-1] > len(args.concepts) or args.ns[0] < 1:
        parser.error(f"--ns {args.ns} needs 1 <= n <= the {len(args.concepts)} concepts given")
    return args


def tuning_folder_name(tuning: ToyTuning, concept: Concept, components: dict) -> str:
    """The --work subfolder for `concept` tuned with `tuning` on the base model `components`: readable settings plus
    a digest of every tuning field, of the base model's weight fingerprint and of the rendered training images, so
    that a file tuned on another base model, other data or other settings is never reused."""
    # A field added later, at the value it stands for when absent, leaves the digest as before, so that files tuned
    # before it existed are found
    settings = repr(tuning)
    for later in ("zoomed_out=0", "embedding_only_steps=0", "regional_share=0.0"):
        settings = settings.replace(f", {later}", "")
    digest = hashlib.sha1(settings.encode())
    digest.update(repr(fingerprint(components["tokenizer"], components["text_encoder"], components["unet"])).encode())
    for image, _, _ in training_images(concept, tuning.images, tuning.seed, image_size(components),
                                       tuning.zoomed_out):
        digest.update(image.tobytes())
    return (f"{tuning.mode}-{tuning.steps}x{tuning.batch_size}-rank{tuning.rank}-lr{tuning.lr_embedding:g}-"
            f"{tuning.lr_text_encoder:g}-{tuning.lr_unet:g}-{digest.hexdigest()[:10]}")


def _format(value: float, percent: bool = True) -> str:
    if math.isnan(value):
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def seed_means(rows: list[dict]) -> list[dict]:
    """One row per (mode, n, method) in first-seen order: every number the mean over the seeds, and `ranges`
    holding each number's (lowest, highest)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["n"], row["method"]), []).append(row)
    table = []
    for (mode, n, method), group in groups.items():
        keys = [k for k, v in group[0].items() if isinstance(v, float)]
        # A seed whose value is undefined (a ratio to an own identity of 0) is left out of that number
        values = {k: [row[k] for row in group if not math.isnan(row[k])] for k in keys}
        table.append({"mode": mode, "n": n, "method": method, "seeds": len(group),
                      **{k: sum(v) / len(v) if v else float("nan") for k, v in values.items()},
                      "ranges": {k: (min(v), max(v)) if v else (float("nan"),) * 2 for k, v in values.items()}})
    # The pooled ratio: the fused model's identity over the seeds against the own models' (seeds whose own models
    # are strong weigh more than in the mean of the seeds' ratios, which one weak seed can swing)
    own = {(row["mode"], row["n"]): row["identity"] for row in table if row["method"] == "own models"}
    for row in table:
        row["identity_pooled_ratio"] = _ratio(row["identity"], own.get((row["mode"], row["n"]), float("nan")))
    return table


def _cell(row: dict, key: str, percent: bool) -> str:
    """A mean, with its [lowest, highest] over the seeds when there were several."""
    text = _format(row[key], percent)
    if row["seeds"] > 1 and not math.isnan(row[key]):
        low, high = row["ranges"][key]
        text += f" [{_format(low, percent)}, {_format(high, percent)}]"
    return text


def print_per_seed(rows: list[dict], seeds: list[int]) -> None:
    """Each fused row's identity kept and binding per seed, so that orderings can be checked seed by seed."""
    cells: dict[tuple, dict[int, str]] = {}
    for row in rows:
        if row["method"] != "own models":
            text = _format(row["identity_ratio"], False)
            if not math.isnan(row["binding"]):
                text += f" / {_format(row['binding'])}"
            if not math.isnan(row["binding_detailed"]):
                text += f" / {_format(row['binding_detailed'])} detailed"
            cells.setdefault((row["mode"], row["n"], row["method"]), {})[row["seed"]] = text
    print("Per seed: identity kept (/ regional binding)\n")
    print("| mode | n | method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |")
    print("|" + "---|" * (3 + len(seeds)))
    for (mode, n, method), by_seed in cells.items():
        print(f"| {mode} | {n} | {method} | " + " | ".join(by_seed.get(seed, "—") for seed in seeds) + " |")
    print()


def print_per_concept(rows: list[dict]) -> None:
    """At the largest n of each mode: every concept's identity from its own model and from each fused model (mean
    over the seeds), and for 2 or 3 concepts each region's object alone from its own model (the ceiling of binding,
    per concept)."""
    means: dict[tuple, dict[str, list[float]]] = {}
    for row in rows:
        for key in ("per_concept", "per_concept_alone"):
            for name, value in row.get(key, {}).items():
                means.setdefault((row["mode"], row["n"], row["method"], key), {}).setdefault(name, []).append(value)
    for mode in dict.fromkeys(row["mode"] for row in rows):
        n = max(row["n"] for row in rows if row["mode"] == mode)
        methods = list(dict.fromkeys(row["method"] for row in rows if row["mode"] == mode and row["n"] == n))
        print(f"Per concept ({mode}, n = {n}): identity, mean over the seeds\n")
        print("| concept | " + " | ".join(methods) + " |")
        print("|" + "---|" * (1 + len(methods)))
        for name in means[(mode, n, "own models", "per_concept")]:
            values = [means[(mode, n, method, "per_concept")][name] for method in methods]
            print(f"| {name} | " + " | ".join(_format(sum(v) / len(v)) for v in values) + " |")
        for n_regions in (2, 3):
            alone = means.get((mode, n_regions, "own models", "per_concept_alone"))
            if alone:
                print(f"\nEach region's object alone from its own model ({n_regions} regions): " + ", ".join(
                    f"{name} {_format(sum(v) / len(v))} (seeds: {', '.join(_format(x) for x in v)})"
                    for name, v in alone.items()))
        print()


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def base_prompt_following(components: dict, classifier, n: int, sampling: dict) -> dict[str, float]:
    """Sample `n` random base-world captions (1-3 objects, no concepts) once each and print how many objects have
    the prompt's attributes; returns the summary over all objects."""
    targets = random_targets(n, sampling["seed"])
    images = sample_targets(concept_pipeline(components, []), targets, 1, desc="base model", **sampling)
    scores = score_samples(classifier, images, targets)
    groups = {"all objects": [s for group in scores for s in group]}
    for count in (1, 2, 3):
        groups[f"{count}-object captions"] = [s for t, group in zip(targets, scores) for s in group
                                              if len(t.scene.objects) == count]
    columns = ("found",) + HEADS + ("position",)
    print(f"\nBase model prompt following: {n} random captions, one image each ({sampling['steps']} steps, guidance "
          f"{sampling['guidance']:g}, seed {sampling['seed']}); every object looked for in its column band and "
          "classified there.\n")
    print("| captions | objects | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 2))
    for name, group in groups.items():
        summary = summarize(group, columns)
        print(f"| {name} | {len(group)} | " + " | ".join(_format(summary[m]) for m in columns) + " |")
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "pattern": 1 / len(PATTERNS),
              "accessory": 1 / len(ACCESSORIES), "background": 1 / len(BACKGROUNDS), "position": 1 / 9}
    print("\nchance (uniform guess): " + ", ".join(f"{k} {v:.0%}" for k, v in chance.items()) +
          " (one object; with several, each is looked for in its own column band, so position chance is 1/3)\n")
    return summarize(groups["all objects"], columns)


def measure(args: argparse.Namespace, seed: int, base, components: dict, classifier, timings: dict,
            progress: bool) -> list[dict]:
    """One seed's rows: tune every concept (or reuse its file), score its own model, fuse the first n with every
    method and score the fused model; `timings` gathers the seconds per stage."""
    work = Path(args.work)
    sampling = {"steps": args.steps, "guidance": args.guidance, "seed": seed, "progress": progress}
    # Layouts (and their regions alone) under the toy's sketch adapter with --sketch; single prompts never
    sketch = Sketch(load_sketch_adapter(base).to(args.device), args.sketch_weight) if args.sketch else None
    targets = {c.name: concept_targets(c, args.prompts, seed) for c in args.concepts}
    used = args.concepts[:args.ns[-1]]
    rows = []
    for mode in args.modes:
        # 1. Each concept tuned alone (reused from --work when the same settings ran before), and its own model
        tuning = ToyTuning(mode=mode, steps=args.tune_steps, batch_size=args.tune_batch, rank=args.tune_rank,
                           lr_embedding=args.tune_lr_embedding, lr_text_encoder=args.tune_lr_text_encoder,
                           lr_unet=args.tune_lr_unet, images=args.tune_images,
                           zoomed_out=args.tune_zoomed_out, embedding_only_steps=args.tune_embedding_only_steps,
                           regional_share=args.tune_regional_share,
                           unet_lora_layers=args.tune_unet_lora_layers,
                           first_word=args.tune_first_word, seed=seed)
        files, own, own_pipes = {}, {}, {}
        for concept in used:
            folder = work / tuning_folder_name(tuning, concept, components)
            path = folder / f"{concept.name}.{mode}.safetensors"
            start = time.perf_counter()
            files[concept.name] = path if path.is_file() else tune_concept(concept, base, components, folder,
                                                                           tuning, progress)
            timings["tuning"] += time.perf_counter() - start
            start = time.perf_counter()
            own_pipes[concept.name] = concept_pipeline(components, [files[concept.name]])
            images = sample_targets(own_pipes[concept.name], targets[concept.name], args.samples,
                                    desc=f"{mode}: {concept.name}'s own model", **sampling)
            own[concept.name] = [s for group in score_samples(classifier, images, targets[concept.name])
                                 for s in group]
            timings["sampling and scoring"] += time.perf_counter() - start

        # 2. Fuse the first n, for every method; sample each concept alone, and the n-region layout for n = 2, 3
        for n in args.ns:
            names = [c.name for c in used[:n]]
            reference = summarize([s for name in names for s in own[name]])
            own_binding = {"binding": float("nan"), "binding_p": float("nan")}
            if n in (2, 3):  # the ceiling of binding: each region's object alone, drawn by its concept's own model
                start = time.perf_counter()
                parts, images = sample_regions_alone([own_pipes[name] for name in names],
                                                     composition_target(used[:n]), args.samples, sketch=sketch,
                                                     **sampling)
                groups = score_samples(classifier, images, parts)
                alone = summarize([s for group in groups for s in group], ("identity", "identity_p"))
                own_binding = {"binding": alone["identity"], "binding_p": alone["identity_p"],
                               "per_concept_alone": {name: summarize(group, ("identity",))["identity"]
                                                     for name, group in zip(names, groups)}}
                timings["sampling and scoring"] += time.perf_counter() - start
            rows.append({"seed": seed, "mode": mode, "n": n, "method": "own models", **reference,
                         "per_concept": {name: summarize(own[name], ("identity",))["identity"] for name in names},
                         "identity_ratio": 1.0, "identity_strict_ratio": 1.0, "identity_p_ratio": 1.0,
                         "fidelity_ratio": 1.0, **own_binding, "regions_alone": own_binding["binding"],
                         "binding_isolated": float("nan"), "binding_detailed": float("nan"),
                         "binding_ratio": _ratio(own_binding["binding"], own_binding["binding"]),
                         "binding_alone_ratio": _ratio(own_binding["binding"], own_binding["binding"])})
            for method in args.methods:
                start = time.perf_counter()
                out = fuse_concepts([files[name] for name in names], base, components,
                                    work / "fused" / f"{mode}-{n}-{method}-seed{seed}", method, args.fusion_steps,
                                    args.guidance, progress, args.rcond, args.fusion_unet_scale,
                                    TOY_STATISTICS_PROMPTS[:args.fusion_prompts], args.fusion_background_weight,
                                    args.fusion_subject_map)
                timings["fusion"] += time.perf_counter() - start
                start = time.perf_counter()
                pipe = fused_pipeline(out).to(args.device)
                scores, per_concept = [], {}
                for name in names:
                    images = sample_targets(pipe, targets[name], args.samples,
                                            desc=f"{mode}, n={n}, {method}: {name}", **sampling)
                    concept_scores = [s for group in score_samples(classifier, images, targets[name])
                                      for s in group]
                    per_concept[name] = summarize(concept_scores, ("identity",))["identity"]
                    scores += concept_scores
                summary = summarize(scores)
                binding = {"binding": float("nan"), "binding_p": float("nan")}
                regions_alone = isolated = detailed = float("nan")
                if n in (2, 3):
                    layout = [composition_target(used[:n])]
                    images = sample_targets(pipe, layout, args.samples, regional=True, sketch=sketch,
                                            desc=f"{mode}, n={n}, {method}: regions", **sampling)
                    flat = [s for group in score_samples(classifier, images, layout) for s in group]
                    binding = binding_summary(flat, layout * len(images[0]))
                    if args.detail_strength > 0:
                        finished = [detail_regions(pipe, images[0], region_details(layout[0]), args.detail_strength,
                                                   args.steps, args.guidance, seed=seed, progress=False)]
                        detailed = summarize([s for group in score_samples(classifier, finished, layout)
                                              for s in group], ("identity",))["identity"]
                    if args.isolate_regions:
                        images = sample_targets(pipe, layout, args.samples, regional=True, isolate=True,
                                                sketch=sketch, desc=f"{mode}, n={n}, {method}: regions, isolated",
                                                **sampling)
                        isolated = summarize([s for group in score_samples(classifier, images, layout)
                                              for s in group], ("identity",))["identity"]
                    # The same model drawing each region's object alone: splits fusion's loss from composing's
                    parts, images = sample_regions_alone([pipe] * n, layout[0], args.samples, sketch=sketch,
                                                         **sampling)
                    regions_alone = summarize([s for group in score_samples(classifier, images, parts)
                                               for s in group], ("identity",))["identity"]
                timings["sampling and scoring"] += time.perf_counter() - start
                fidelity = sum(summary[m] for m in FIDELITY) / len(FIDELITY)
                own_fidelity = sum(reference[m] for m in FIDELITY) / len(FIDELITY)
                rows.append({"seed": seed, "mode": mode, "n": n, "method": method, **summary,
                             "per_concept": per_concept,
                             "identity_ratio": _ratio(summary["identity"], reference["identity"]),
                             "identity_strict_ratio": _ratio(summary["identity_strict"],
                                                             reference["identity_strict"]),
                             "identity_p_ratio": _ratio(summary["identity_p"], reference["identity_p"]),
                             "fidelity_ratio": _ratio(fidelity, own_fidelity), "binding": binding["binding"],
                             "binding_p": binding["binding_p"], "regions_alone": regions_alone,
                             "binding_isolated": isolated, "binding_detailed": detailed,
                             "binding_ratio": _ratio(binding["binding"], own_binding["binding"]),
                             "binding_alone_ratio": _ratio(binding["binding"], regions_alone)})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    base, components, classifier = load_toy_world(args.base)
    if args.sketch and load_sketch_adapter(base) is None:
        raise SystemExit(f"--sketch: {base} has no sketch adapter; train one with `python "
                         f"scripts/train_toy_sketch_adapter.py --base {base}`")
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(args.device)
    sampling = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "progress": progress}
    used = args.concepts[:args.ns[-1]]
    timings = {"tuning": 0.0, "fusion": 0.0, "sampling and scoring": 0.0}
    if args.base_prompts:
        start = time.perf_counter()
        base_prompt_following(components, classifier, args.base_prompts, sampling)
        timings["base model"] = time.perf_counter() - start
        if args.base_only:
            return

    rows = [row for seed in args.seeds
            for row in measure(args, seed, base, components, classifier, timings, progress)]

    # 3. The table: one row per (mode, n, method), the mean over the seeds and, with several, its range
    sketch_note = f", layouts under their sketch (weight {args.sketch_weight:g})" if args.sketch else ""
    scale_note = (f"{args.fusion_unet_scale:g}" if args.fusion_unet_scale is not None else
                  f"{TOY_FUSION_UNET_SCALE:g} from {TOY_FUSION_BOOST_FROM} concepts on, else 1")
    print(f"\nToy-world fusion quality: base {base}; concepts {', '.join(c.name for c in used)}; "
          f"{args.prompts} prompt(s) x {args.samples} sample(s) per concept; tuning on {args.tune_images} images "
          f"(+{args.tune_zoomed_out} zoomed out), "
          f"{args.tune_steps} steps x batch {args.tune_batch} ({args.tune_embedding_only_steps} of them embeddings "
          f"only), rank {args.tune_rank}, UNet LoRA on "
          f"{args.tune_unet_lora_layers}, learning rates "
          f"{args.tune_lr_embedding:g} (embeddings) / {args.tune_lr_text_encoder:g} (text-encoder LoRA) / "
          f"{args.tune_lr_unet:g} (UNet); fusion cutoff {args.rcond:g}, "
          f"UNet LoRA scale {scale_note}, {args.fusion_prompts} statistics prompt(s), background rows weighted "
          f"{args.fusion_background_weight:g}"
          f"{f' ({args.fusion_subject_map})' if args.fusion_background_weight < 1 else ''}; "
          f"sampling {args.steps} steps, "
          f"guidance {args.guidance:g}{sketch_note}; seed(s) {', '.join(map(str, args.seeds))}; "
          f"device {args.device}, torch threads {torch.get_num_threads()}; {time.perf_counter() - started:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).\n")
    if len(args.seeds) > 1:
        print("Each cell: the mean over the seeds (a seed whose own identity is 0 has no ratio and is left out of "
              "it), and [lowest, highest] for the ratios and binding.\n")
    header = ["mode", "n", "method", *(c.replace("_", " ") for c in COLUMNS), "identity vs own",
              "identity vs own, pooled", "strict vs own",
              "identity p vs own", "fidelity vs own", "regional binding", "binding p", "binding vs own",
              "regions alone", "binding vs alone"] + (["binding, isolated"] if args.isolate_regions else []) \
        + (["binding, detailed"] if args.detail_strength > 0 else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    table = seed_means(rows)
    for row in table:
        cells = [row["mode"], str(row["n"]), row["method"], *(_format(row[m]) for m in COLUMNS),
                 _cell(row, "identity_ratio", False), _format(row["identity_pooled_ratio"], False),
                 _cell(row, "identity_strict_ratio", False),
                 _cell(row, "identity_p_ratio", False),
                 _cell(row, "fidelity_ratio", False), _cell(row, "binding", True), _format(row["binding_p"]),
                 _cell(row, "binding_ratio", False), _cell(row, "regions_alone", True),
                 _cell(row, "binding_alone_ratio", False)]
        if args.isolate_regions:
            cells.append(_cell(row, "binding_isolated", True))
        if args.detail_strength > 0:
            cells.append(_cell(row, "binding_detailed", True))
        print("| " + " | ".join(cells) + " |")
    print("\nRegional binding of the own-models rows: the identity each concept's own model reaches drawing its "
          "region's object alone (same size, place, background and noise), the ceiling of binding; 'binding vs "
          "own' is the fused model's binding over it. 'regions alone': the row's model drawing each region's object "
          "alone (for the own models, the ceiling again); 'binding vs alone': what composing the regions in one "
          "image keeps of it. 'binding, isolated': the binding with the regions also kept apart in self-attention. "
          "'binding, detailed': the same layouts after a region detail pass (each region redrawn from the window "
          f"in which its object appears medium-sized, strength {args.detail_strength:g}; `region_details`).\n")
    if len(args.seeds) > 1:
        print_per_seed(rows, args.seeds)
    print_per_concept(rows)
    for row in table:
        if row["method"] == "gradient" and row["n"] == 6:
            met = "met" if row["identity_ratio"] >= IDENTITY_GOAL else "NOT met"
            print(f"goal ({row['mode']}): gradient fusion keeps >= {IDENTITY_GOAL:.0%} of identity at n = 6: "
                  f"{_cell(row, 'identity_ratio', False)} — {met} (pooled over the seeds: "
                  f"{_format(row['identity_pooled_ratio'], False)}; soft identity: "
                  f"{_format(row['identity_p_ratio'], False)})")
        if row["n"] == 3 and row["method"] != "own models" and not math.isnan(row["binding"]):
            met = "met" if row["binding"] >= BINDING_GOAL else "NOT met"
            print(f"goal ({row['mode']}, {row['method']}): >= {BINDING_GOAL:.0%} regional binding with 3 concepts: "
                  f"{_cell(row, 'binding', True)} — {met}")
            if args.detail_strength > 0:
                met = "met" if row["binding_detailed"] >= BINDING_GOAL else "NOT met"
                print(f"goal ({row['mode']}, {row['method']}), with the detail pass: "
                      f"{_cell(row, 'binding_detailed', True)} — {met}")


if __name__ == "__main__":
    main()
