"""Center-node fusion: concept files (+ optional client statistics) -> one fused model folder.

Order (Mix-of-Show): text-encoder layers first, then the cross-attention K/V layers from the *fused* text
encoder's encodings, then every other UNet layer from each concept's own sampling run. Statistics are Gram
matrices streamed into one accumulator per layer, so memory does not grow with the number of concepts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from ..attention import AttentionMapRecorder
from ..concept_file import ConceptFile, load_concept
from ..config import FuseConfig, FusionConcept
from ..errors import MixOfShowError
from ..lora import align_module_paths, base_weight, check_lora_shapes, lora_delta, target_paths
from ..models import load_base_components
from ..pipelines import MixOfShowPipeline
from ..pipelines.pipeline_mixofshow import CONCEPTS_FILE
from ..tokens import check_new_words
from .solve import GramAccumulator, gradient_fusion, lbfgs_fusion, weight_fusion, zip_fusion
from .stats import ConceptStatistics, Guidance, cross_attention_grams, record_input_grams, subject_weights

logger = logging.getLogger(__name__)

REPORT_FILE = "fusion_report.json"
KV_SUFFIXES = ("attn2.to_k", "attn2.to_v")
SHARD_SIZE = "1GB"  # weight files are written one shard at a time: host memory stays below a shard or two


@dataclass
class FusionInput:
    """One concept ready for fusion: its file (words renamed if they collided) and where it came from."""

    spec: FusionConcept
    concept: ConceptFile
    sha256: str
    renamed: dict[str, str]
    statistics: ConceptStatistics | None = None

    @property
    def text(self) -> str:
        return " ".join(self.concept.words)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _renamed(word: str, taken: set[str], tokenizer, num_layers: int) -> str:
    """`word`, or `<word~2>`, `<word~3>`, … when it is already taken or known to the tokenizer."""
    candidate, n = word, 1
    while True:
        try:
            if candidate in taken:
                raise MixOfShowError("taken")
            check_new_words(tokenizer, (candidate,), num_layers)
            return candidate
        except MixOfShowError:
            n += 1
            candidate = f"<{word.strip('<>')}~{n}>"


def prepare_inputs(config: FuseConfig, pipe: MixOfShowPipeline) -> list[FusionInput]:
    """Load and check every concept (and statistics) file before any model work; rename colliding words."""
    tokenizer, num_layers, model_fingerprint = pipe.tokenizer, pipe.num_layers, pipe.base_fingerprint
    missing = [c.path for c in config.concepts if not Path(c.path).is_file()]
    missing += [c.stats for c in config.concepts if c.stats and not Path(c.stats).is_file()]
    if missing:
        raise MixOfShowError(f"file(s) not found: {', '.join(missing)}")
    inputs, taken = [], set()
    for spec in config.concepts:
        concept = load_concept(spec.path)
        concept.base.check(model_fingerprint, spec.path)
        if concept.base.same_weights(model_fingerprint) is False:
            raise MixOfShowError(
                f"{spec.path} was trained on a base model with other weights than {config.base}: fusing it would "
                "mix models. Fuse onto the base it was trained on"
            )
        check_lora_shapes(pipe.text_encoder, align_module_paths(pipe.text_encoder, concept.text_encoder_lora),
                          "text_encoder", spec.path)
        check_lora_shapes(pipe.unet, concept.unet_lora, "unet", spec.path)
        for word in concept.words:
            pipe.concepts.check(tokenizer, pipe.text_encoder, word, concept.embeddings[word])
        if not concept.words and not spec.prompts:
            raise MixOfShowError(f"{spec.path} has no concept words: give its trigger prompts in 'prompts'")
        renamed = {}
        for word in concept.words:
            new = _renamed(word, taken, tokenizer, num_layers)
            taken.add(new)
            if new != word:
                renamed[word] = new
                logger.warning("concept word %s of %s collides with an earlier one: renamed to %s", word, spec.path,
                               new)
        if renamed:
            concept = dataclasses.replace(
                concept,
                words=tuple(renamed.get(w, w) for w in concept.words),
                embeddings={renamed.get(w, w): e for w, e in concept.embeddings.items()},
            )
        item = FusionInput(spec, concept, file_sha256(spec.path), renamed)
        if spec.stats:
            item.statistics = ConceptStatistics.load(spec.stats)
            recorded_for = item.statistics.metadata.get("concept_sha256")
            if recorded_for != item.sha256:
                raise MixOfShowError(f"statistics {spec.stats} were computed for another concept file than "
                                     f"{spec.path}: recompute them with `mixofshow stats`")
            for key in ("unet_scale", "text_encoder_scale"):
                if item.statistics.metadata.get(key) != getattr(spec, key):
                    raise MixOfShowError(f"statistics {spec.stats} were computed with {key} "
                                         f"{item.statistics.metadata.get(key)}, the fusion uses {getattr(spec, key)}")
            recorded = item.statistics.metadata.get("settings", {})
            keys = [("background_weight", 1.0)]
            if config.background_weight < 1:  # the subject map shapes the rows' weights only below weight 1
                keys.append(("subject_map", "linear"))
            for key, default in keys:
                if recorded.get(key, default) != getattr(config, key):
                    raise MixOfShowError(f"statistics {spec.stats} were recorded with {key} "
                                         f"{recorded.get(key, default)}, the fusion uses {getattr(config, key)}: "
                                         "give both the same value, or recompute them with `mixofshow stats` and "
                                         "the fusion's config")
        inputs.append(item)
    return inputs


def concept_prompts(item: FusionInput, templates: tuple[str, ...]) -> list[str]:
    """The concept's prompts: its own `prompts`, or the templates filled with its words."""
    return list(item.spec.prompts) or [t.format(item.text) for t in templates]


@contextmanager
def concept_model(pipe: MixOfShowPipeline, item: FusionInput | None, bases: dict[str, dict[str, torch.Tensor]]):
    """While open, the working pipeline is concept `item`'s own model (its LoRA at its scales merged into the
    weights; None: the base). On exit every layer the LoRA touched gets its weight from `bases` back, exactly.

    Merging costs nothing per sampling step, unlike an adapter kept beside the weights."""
    deltas = concept_deltas(pipe, item) if item else {}
    try:
        with torch.no_grad():
            for part, model in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet)):
                for path, delta in deltas.get(part, {}).items():
                    weight = base_weight(model, path)
                    weight.copy_((bases[part][path].float() + delta).to(weight.dtype))
        del deltas
        yield
    finally:
        with torch.no_grad():
            for part, model in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet)):
                for path in (item and concept_loras(pipe, item)[part][0]) or ():
                    base_weight(model, path).copy_(bases[part][path])


def statistics_paths(pipe: MixOfShowPipeline, text_layers, unet_layers) -> tuple[list[str], list[str]]:
    """The layers whose inputs a statistics run records: every LoRA target by default plus the given layers
    (text encoder; UNet without the cross-attention K/V, whose inputs are the fused text encoder's)."""
    text_paths = sorted(set(target_paths(pipe.text_encoder, "text_encoder")) | set(text_layers))
    unet_paths = [p for p in sorted(set(target_paths(pipe.unet, "unet")) | set(unet_layers))
                  if not p.endswith(KV_SUFFIXES)]
    return text_paths, unet_paths


def record_statistics(pipe: MixOfShowPipeline, config: FuseConfig, text_prompts: list[str],
                      sampling_prompts: list[str], text_paths: list[str], unet_paths: list[str]) -> ConceptStatistics:
    """Grams of the pipeline's model as it is (a concept's own model inside `concept_model`): text-encoder layers on
    the encoded prompts (padding and the negative prompt included, as the sampler encodes them), UNet layers (no
    K/V) over a full sampling run per prompt, rows weighted by `concept_row_weights` when
    `config.background_weight` < 1."""
    stats = ConceptStatistics()
    guidance = sampler_guidance(config)
    ids = pipe.layerwise_input_ids(text_prompts, [config.negative_prompt] * len(text_prompts))  # (L, 2B, T)
    ids = ids.view(ids.shape[0], 2, -1, ids.shape[-1]).transpose(0, 1).reshape(-1, ids.shape[-1])  # [u; c]
    with torch.no_grad(), record_input_grams(pipe.text_encoder, text_paths, stats.grams["text_encoder"], guidance):
        pipe.text_encoder(ids.to(pipe.device))
    size = config.sampling_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sampling = {"negative_prompt": config.negative_prompt, "height": size, "width": size,
                "num_inference_steps": config.sampling_steps, "guidance_scale": config.sampling_guidance,
                "seed": config.sampling_seed, "output_type": "latent", "progress": False}
    for prompt in sampling_prompts:
        weights = concept_row_weights(pipe, prompt, sampling, config.background_weight, config.subject_map)
        with record_input_grams(pipe.unet, unet_paths, stats.grams["unet"], guidance, weights):
            pipe(prompt, **sampling)
    return stats


def concept_row_weights(pipe: MixOfShowPipeline, prompt: str, sampling: dict, background: float,
                        subject_map: str = "linear") -> torch.Tensor | None:
    """Weights of one statistics run's UNet rows: where the prompt's concept words are attended while it samples
    (a first run of the same sampling, recording their cross-attention), `background` elsewhere; `subject_map` is
    the shape of that weighting (`subject_weights`).

    A concept's LoRA was trained with its loss inside the subject mask; rows on the background, which every
    concept's runs share, would otherwise outvote the few rows where the concept is drawn. None (every row alike)
    when `background` is 1 or the prompt has no concept words (a LoRA with trigger prompts)."""
    if background >= 1:
        return None
    ids = pipe.layerwise_input_ids([prompt], None)[0, 0]  # (T,) layer-0 ids, as the sampler binds them
    concept_ids = torch.tensor([token.layer_ids[0] for token in pipe.concepts.tokens.values()], dtype=ids.dtype)
    positions = torch.isin(ids, concept_ids).nonzero().flatten()
    if positions.numel() == 0:
        logger.info("statistics prompt %r has no concept words: its rows are weighted alike", prompt)
        return None
    batch = 2 if sampling["guidance_scale"] > 1 else 1  # [negative; prompt] under guidance
    with pipe.recording_attention(AttentionMapRecorder(positions[None].repeat(batch, 1))) as recorder:
        pipe(prompt, **sampling)
    latent = (sampling["height"] // pipe.vae_scale_factor, sampling["width"] // pipe.vae_scale_factor)
    return subject_weights([m[-1:] for m in recorder.maps], latent, background, subject_map)


def sampler_guidance(config: FuseConfig) -> Guidance | None:
    """The guidance pairing of the sampler's batches, when it guides and guided rows are wanted."""
    return Guidance(config.sampling_guidance, config.guided_weight) if config.sampling_guidance > 1 else None


def concept_deltas(pipe: MixOfShowPipeline, item: FusionInput, paths: set[str] | None = None
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """`{part: {path: dW}}` of a concept at its scales (float32, on the model's device), optionally only `paths`.

    Built when a stage needs them and dropped after, so memory does not grow with the number of concepts."""
    device = pipe.device  # (a walk over every module: once, not per layer)
    return {part: {path: lora_delta(a.to(device), b.to(device), item.concept.rank, item.concept.alpha, scale)
                   for path, (a, b) in lora.items() if paths is None or path in paths}
            for part, (lora, scale) in concept_loras(pipe, item).items()}


def concept_loras(pipe: MixOfShowPipeline, item: FusionInput) -> dict[str, tuple[dict, float]]:
    """`{part: ({path: (A, B)}, scale)}` of a concept, paths as in the working pipeline's models."""
    return {"text_encoder": (align_module_paths(pipe.text_encoder, item.concept.text_encoder_lora),
                             item.spec.text_encoder_scale),
            "unet": (item.concept.unet_lora, item.spec.unet_scale)}


def reference_weights(pipe: MixOfShowPipeline, inputs: list[FusionInput], weights: list[float],
                      bases: dict[str, dict[str, torch.Tensor]]) -> tuple[dict, dict]:
    """Weight fusion (`weights`) and the plain sum of the LoRAs, `{part: {path: W}}`, one layer at a time."""
    loras = [concept_loras(pipe, item) for item in inputs]
    weight_fused, summed = {}, {}
    for part, base in bases.items():
        weight_fused[part], summed[part] = {}, {}
        for path, w0 in base.items():
            deltas = []
            for item, lora in zip(inputs, loras):
                weights_of_part, scale = lora[part]
                if path in weights_of_part:
                    a, b = (t.to(w0.device) for t in weights_of_part[path])
                    deltas.append(lora_delta(a, b, item.concept.rank, item.concept.alpha, scale))
                else:
                    deltas.append(torch.zeros_like(w0, dtype=torch.float32))
            weight_fused[part][path] = weight_fusion(w0, deltas, weights)
            summed[part][path] = weight_fusion(w0, deltas, [1.0] * len(deltas))
    return weight_fused, summed


class LayerProblems:
    """The per-layer least-squares problems of one stage: a streamed accumulator per layer, plus (for the
    iterative methods only) every concept's own delta and Gram."""

    def __init__(self, weights: dict[str, torch.Tensor], keep_lists: bool):
        self.base = weights
        self.accumulators = {p: GramAccumulator.zeros(*w.shape, device=w.device) for p, w in weights.items()}
        self.lists: dict[str, tuple[list, list]] | None = {p: ([], []) for p in weights} if keep_lists else None

    def add(self, deltas: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], gram_weight: float = 1.0,
            source: str = "the statistics"):
        """Stream in one concept (or the prior): its deltas (missing = 0) and its Grams (`gram_weight` times)."""
        for path, accumulator in self.accumulators.items():
            if path not in grams:
                raise MixOfShowError(f"{source} hold no statistics for layer {path}, which another concept's LoRA "
                                     "changes: leave out that 'stats' entry so the center records the concept")
            delta = deltas.get(path, torch.zeros_like(self.base[path], dtype=torch.float32))
            gram = grams[path].to(accumulator.gram.device) * gram_weight
            accumulator.add(delta, gram)
            if self.lists is not None:
                self.lists[path][0].append(delta)
                self.lists[path][1].append(gram)

    def sum_across_processes(self) -> None:
        """Add up every process's accumulators (each process streamed its share of the concepts)."""
        import torch.distributed as dist

        for accumulator in self.accumulators.values():
            constant = torch.as_tensor(accumulator.constant, dtype=torch.float64, device=accumulator.gram.device)
            for tensor in (accumulator.delta_gram, accumulator.gram, constant):
                dist.all_reduce(tensor)
            accumulator.constant = constant

    def solve(self, method: str, config: FuseConfig, iterations: int, anchors: dict[str, torch.Tensor],
              progress: bool = True) -> dict[str, torch.Tensor]:
        """Fused weights of every layer; `anchors` (weight fusion) fill the directions no input excites."""
        fused = {}
        for path, w0 in tqdm(self.base.items(), desc=f"solve ({method})", leave=False,
                            disable=not progress or len(self.base) < 8):
            if method == "gradient":
                anchor = anchors[path].double() - w0.double()
                fused[path] = gradient_fusion(w0, self.accumulators[path], rcond=config.rcond, anchor=anchor)
            elif method == "zip":
                fused[path] = zip_fusion(w0, *self.lists[path], steps=config.zip_steps, lr=config.zip_lr,
                                         similarity_weight=config.zip_similarity_weight)
            else:
                fused[path] = lbfgs_fusion(w0, *self.lists[path], iterations=iterations)
        return fused

    def report(self, fused: dict[str, torch.Tensor], weight_fused: dict[str, torch.Tensor],
               summed: dict[str, torch.Tensor]) -> dict:
        """Per layer, the objective at W0, at weight fusion, at the plain sum of the LoRAs, and at the result."""
        rows = {}
        for path, accumulator in self.accumulators.items():
            w0 = self.base[path].double()
            rows[path] = {
                "objective_base": accumulator.objective(torch.zeros_like(w0)),
                "objective_weight_fusion": accumulator.objective(weight_fused[path].double() - w0),
                "objective_sum": accumulator.objective(summed[path].double() - w0),
                "objective_fused": accumulator.objective(fused[path].double() - w0),
            }
        return rows


def process_group() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group `accelerate launch` set up, or (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _weights_of(model, paths) -> dict[str, torch.Tensor]:
    return {p: base_weight(model, p).detach().clone() for p in paths}


def fuse(config: FuseConfig, components: dict | None = None, progress: bool = True,
         copy_components: bool = True) -> Path:
    """Fuse the configured concepts into one model folder.

    Args:
        config: the fusion config (`load_fuse_config`).
        components: already-loaded base components instead of loading `config.base` (on the device and in the
            dtype to fuse in).
        progress: show progress bars.
        copy_components: work on a copy of `components`, leaving them unchanged; False lets the fusion use
            (and change) them, saving one model's memory.

    Returns:
        The output folder: a diffusers pipeline (`StableDiffusionPipeline.from_pretrained`-loadable) plus
        `concepts.json` and `fusion_report.json`.
    """
    started = time.perf_counter()
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise MixOfShowError(f"output folder {out} exists and is not empty: choose another or set overwrite")

    # 1. The base model (a private copy: the fused weights are written into it), every input checked before any work
    if components is None:
        components = load_base_components(config.base)
    elif copy_components:
        components = copy.deepcopy(components)
    pipe = MixOfShowPipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    inputs = prepare_inputs(config, pipe)
    # 2. Every concept's words into the tokenizer; its LoRA is merged into the weights while its statistics run
    for item in inputs:
        for word in item.concept.words:
            pipe.concepts.add(pipe.tokenizer, pipe.text_encoder, word, item.concept.embeddings[word])
    paths = [{part: set(lora) for part, (lora, _) in concept_loras(pipe, item).items()} for item in inputs]
    unet_layers = sorted(set().union(*(p["unet"] for p in paths)))
    kv_layers = [p for p in unet_layers if p.endswith(KV_SUFFIXES)]
    spatial_layers = [p for p in unet_layers if p not in kv_layers]
    weights = [item.spec.weight if item.spec.weight is not None else 1.0 / len(inputs) for item in inputs]

    text_base = _weights_of(pipe.text_encoder, sorted(set().union(*(p["text_encoder"] for p in paths))))
    unet_base = _weights_of(pipe.unet, unet_layers)
    weight_fused, summed = reference_weights(pipe, inputs, weights, {"text_encoder": text_base, "unet": unet_base})
    report: dict = {"method": config.method, "layers": {}}
    if config.method == "weight":
        fused_text, fused_unet = weight_fused["text_encoder"], weight_fused["unet"]
    else:
        fused_text, fused_unet = _solve(config, pipe, inputs, text_base, unet_base, kv_layers, spatial_layers,
                                        (weight_fused, summed), report, progress)
    del weight_fused, summed

    # 3. Write the fused weights (the concept tokens are already in), then save atomically
    for model, fused in ((pipe.text_encoder, fused_text), (pipe.unet, fused_unet)):
        with torch.no_grad():
            for path, weight in fused.items():
                target = base_weight(model, path)
                target.copy_(weight.to(target.device, target.dtype))
    report.update({
        "inputs": [{"path": i.spec.path, "sha256": i.sha256, "words": list(i.concept.words), "renamed": i.renamed,
                    "unet_scale": i.spec.unet_scale, "text_encoder_scale": i.spec.text_encoder_scale,
                    "weight": w, "statistics": i.spec.stats} for i, w in zip(inputs, weights)],
        "config": dataclasses.asdict(config),
        "seconds": round(time.perf_counter() - started, 3),
    })
    concepts_json = {"format": "mixofshow.concepts", "version": 1,
                     "tokens": pipe.concepts.to_json(pipe.tokenizer),
                     "concepts": [{"source": i.spec.path, "words": list(i.concept.words), "renamed": i.renamed}
                                  for i in inputs]}
    if process_group()[0] == 0:
        save_model_folder(pipe, out, {CONCEPTS_FILE: concepts_json, REPORT_FILE: report}, config.overwrite)
    logger.info("fused %d concept(s) with %s fusion into %s in %.1f s", len(inputs), config.method, out,
                report["seconds"])
    return out


def _solve(config, pipe, inputs, text_base, unet_base, kv_layers, spatial_layers, references, report,
           progress):
    """Statistics and solves for gradient / zip / lbfgs: text encoder, then K/V, then the other UNet layers."""
    keep_lists = config.method in ("zip", "lbfgs")
    text_problems = LayerProblems(text_base, keep_lists)
    spatial_problems = LayerProblems({p: unet_base[p] for p in spatial_layers}, keep_lists)
    text_paths, unet_paths = statistics_paths(pipe, text_base, spatial_layers)

    # Text encoder and spatial layers: each concept's own model (or the client's statistics file)
    # Under `accelerate launch` each process takes every world-th concept; the sums are then added up.
    bases = {"text_encoder": text_base, "unet": unet_base}
    rank, world = process_group()
    if world > 1 and keep_lists:
        raise MixOfShowError(f"method {config.method!r} runs in one process; use `gradient` with several")
    runs = [item for index, item in enumerate(inputs) if index % world == rank]
    for item in tqdm(runs, desc="concept statistics", disable=not progress):
        if item.statistics:
            stats = item.statistics
        else:
            with concept_model(pipe, item, bases):
                stats = record_statistics(pipe, config, concept_prompts(item, config.text_templates),
                                          concept_prompts(item, config.sampling_templates), text_paths, unet_paths)
        delta = concept_deltas(pipe, item, set(text_base) | set(spatial_layers))
        source = item.spec.stats or "the statistics"
        text_problems.add(delta["text_encoder"], stats.grams["text_encoder"], source=source)
        spatial_problems.add(delta["unet"], stats.grams["unet"], source=source)
    if config.prior_weight > 0 and rank == 0:
        prior = record_statistics(pipe, config, list(config.prior_prompts), list(config.prior_prompts),
                                  text_paths, unet_paths)
        text_problems.add({}, prior.grams["text_encoder"], config.prior_weight)
        spatial_problems.add({}, prior.grams["unet"], config.prior_weight)
    if world > 1:
        text_problems.sum_across_processes()
        spatial_problems.sum_across_processes()
    weight_fused, summed = references
    fused_text = text_problems.solve(config.method, config, config.lbfgs_text_iterations,
                                     weight_fused["text_encoder"], progress)

    # Cross-attention K/V: inputs are the fused text encoder's encodings of each concept's prompts
    with torch.no_grad():
        for path, weight in fused_text.items():
            base_weight(pipe.text_encoder, path).copy_(weight)
    kv_problems = LayerProblems({p: unet_base[p] for p in kv_layers}, keep_lists)
    prompt_sets = [(item, concept_prompts(item, config.text_templates + config.sampling_templates), 1.0)
                   for item in inputs]
    if config.prior_weight > 0:
        prompt_sets.append((None, list(config.prior_prompts), config.prior_weight))
    for item, prompts, gram_weight in prompt_sets:
        delta = concept_deltas(pipe, item, set(kv_layers))["unet"] if item else {}
        with torch.no_grad():
            states = pipe.encode_layerwise_prompt(list(dict.fromkeys(prompts)),
                                                  [config.negative_prompt] * len(dict.fromkeys(prompts)))
        grams = cross_attention_grams(pipe.unet, states, kv_layers, sampler_guidance(config))
        kv_problems.add(delta, grams, gram_weight)
    fused_kv = kv_problems.solve(config.method, config, config.lbfgs_text_iterations, weight_fused["unet"], progress)
    fused_spatial = spatial_problems.solve(config.method, config, config.lbfgs_unet_iterations, weight_fused["unet"],
                                           progress)

    report["layers"] = {
        "text_encoder": text_problems.report(fused_text, weight_fused["text_encoder"], summed["text_encoder"]),
        "unet": {**kv_problems.report(fused_kv, weight_fused["unet"], summed["unet"]),
                 **spatial_problems.report(fused_spatial, weight_fused["unet"], summed["unet"])},
    }
    totals = {}
    for key in ("objective_base", "objective_weight_fusion", "objective_sum", "objective_fused"):
        totals[key] = sum(r[key] for part in report["layers"].values() for r in part.values())
    report["totals"] = totals
    return fused_text, {**fused_kv, **fused_spatial}


def save_model_folder(pipe: MixOfShowPipeline, out: Path, extra_json: dict[str, dict], overwrite: bool) -> None:
    """Save a pipeline folder plus JSON files atomically: build it beside `out`, then swap it in."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    try:
        StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(
            building, max_shard_size=SHARD_SIZE)
        for name, data in extra_json.items():
            (building / name).write_text(json.dumps(data, indent=1, default=_json_default))
        if out.exists():
            if not overwrite:
                raise MixOfShowError(f"output folder {out} appeared while fusing; nothing was replaced")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(building, out)
            shutil.rmtree(old)
        else:
            os.replace(building, out)
    finally:
        if building.exists():
            shutil.rmtree(building)


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def compute_statistics(config: FuseConfig, out: str | Path, components: dict | None = None,
                       copy_components: bool = True) -> Path:
    """A client's statistics of its one concept (`config.concepts[0]`), for `fuse` to use instead of a run.

    Args:
        config: a fusion config with exactly one concept; its templates and sampling settings are recorded.
        out: the statistics file to write (.safetensors).
        components: already-loaded base components instead of loading `config.base`.
        copy_components: work on a copy of `components`, leaving them unchanged; False lets the run add the
            concept's words to them, saving one model's memory.

    Returns:
        The path written.
    """
    if len(config.concepts) != 1:
        raise MixOfShowError("statistics are computed for exactly one concept file")
    if not str(out).endswith(".safetensors"):
        raise MixOfShowError(f"the statistics file must be a .safetensors file, got {out}")
    if components is None:
        components = load_base_components(config.base)
    elif copy_components:
        components = copy.deepcopy(components)
    pipe = MixOfShowPipeline(**{k: components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    (item,) = prepare_inputs(dataclasses.replace(config, concepts=(dataclasses.replace(config.concepts[0],
                                                                                       stats=None),)), pipe)
    for word in item.concept.words:
        pipe.concepts.add(pipe.tokenizer, pipe.text_encoder, word, item.concept.embeddings[word])
    layers = {part: sorted(lora) for part, (lora, _) in concept_loras(pipe, item).items()}
    bases = {"text_encoder": _weights_of(pipe.text_encoder, layers["text_encoder"]),
             "unet": _weights_of(pipe.unet, layers["unet"])}
    with concept_model(pipe, item, bases):
        stats = record_statistics(pipe, config, concept_prompts(item, config.text_templates),
                                  concept_prompts(item, config.sampling_templates),
                                  *statistics_paths(pipe, layers["text_encoder"], layers["unet"]))
    stats.metadata = {
        "concept_sha256": item.sha256,
        "concept_path": str(item.spec.path),
        "unet_scale": item.spec.unet_scale,
        "text_encoder_scale": item.spec.text_encoder_scale,
        "base": dataclasses.asdict(pipe.base_fingerprint),
        "settings": {k: getattr(config, k) for k in ("text_templates", "sampling_templates", "negative_prompt",
                                                      "sampling_steps", "sampling_guidance", "sampling_size",
                                                      "sampling_seed", "guided_weight", "background_weight",
                                                      "subject_map")},
    }
    return stats.save(out)
