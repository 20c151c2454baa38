"""`MixOfShowPipeline`: Stable Diffusion sampling with concept files loaded at given scales and layer-wise prompts."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

from ..attention import (
    LAYERWISE_KEY,
    RECORDER_KEY,
    REGIONS_KEY,
    AttentionMapRecorder,
    RegionalAttention,
    install_processors,
)
from ..concept_file import ConceptFile, fingerprint, load_concept
from ..errors import MixOfShowError
from ..layout import Layout
from ..lora import activate, align_module_paths, check_lora_shapes, load_lora, lora_layers, set_lora_scale
from ..models import load_base_components
from ..tokens import ConceptVocabulary, encode_layerwise
from .detail import detail_regions, layout_details
from .regional import ConditionResiduals, RegionPrompts, SpatialCondition, load_spatial_conditions

logger = logging.getLogger(__name__)

CONCEPTS_FILE = "concepts.json"  # in a model folder: {"tokens": {word: [layer-wise token names]}, ...}

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
}


class MixOfShowPipeline(StableDiffusionPipeline):
    """Text-to-image with Mix-of-Show concepts: each prompt is encoded once per cross-attention layer.

    Build it from components (`MixOfShowPipeline(vae=…, text_encoder=…, …)`), from a base model
    (`from_base`), then `load_concept(file, scale)` any number of concept files and call it with prompts that
    use the concept words (`"a <hina1> <hina2> near the sea"`).
    """

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self.num_layers = install_processors(unet)
        self.concepts = ConceptVocabulary(self.num_layers)
        self.base_fingerprint = fingerprint(tokenizer, text_encoder, unet)
        self._attention_recorder: AttentionMapRecorder | None = None
        self.adapter_scales: dict[str, float] = {}

    @classmethod
    def from_base(cls, base: str | Path, dtype: torch.dtype = torch.float32) -> MixOfShowPipeline:
        """A pipeline from a base model: diffusers folder (a fused model's concepts included), single
        checkpoint file or Hub id."""
        pipe = cls(**load_base_components(base, dtype))
        concepts_file = Path(base) / CONCEPTS_FILE
        if concepts_file.is_file():
            try:
                tokens = json.loads(concepts_file.read_text())["tokens"]
            except (ValueError, KeyError, OSError) as error:
                raise MixOfShowError(f"{concepts_file} is not a valid concepts file ({error})") from None
            pipe.concepts = ConceptVocabulary.from_json(tokens, pipe.tokenizer, pipe.num_layers)
        return pipe

    # -- concepts -------------------------------------------------------------------------------------------------

    def load_concept(self, concept: str | Path | ConceptFile, scale: float = 1.0, name: str | None = None,
                     source: str | None = None) -> str:
        """Add a concept: its words to the tokenizer and text encoder, its LoRA as a PEFT adapter at `scale`.

        Args:
            concept: a concept file (ours or an official `.pth`) or a loaded `ConceptFile`.
            scale: the LoRA scale (0 = embeddings only, 1 = as trained).
            name: the adapter name; defaults to the first word.
            source: how to name the concept in error messages (default: its path).

        Returns:
            The adapter name, for `set_concept_scale`.
        """
        source = source or (str(concept) if not isinstance(concept, ConceptFile) else "concept")
        concept = concept if isinstance(concept, ConceptFile) else load_concept(concept)
        if not torch.isfinite(torch.tensor(float(scale))):
            raise MixOfShowError(f"LoRA scale for {source} must be a finite number, got {scale}")
        concept.base.check(self.base_fingerprint, source)
        text_encoder_lora = align_module_paths(self.text_encoder, concept.text_encoder_lora)
        check_lora_shapes(self.text_encoder, text_encoder_lora, "text_encoder", source)
        check_lora_shapes(self.unet, concept.unet_lora, "unet", source)
        for word in concept.words:
            if word in self.concepts:
                raise MixOfShowError(f"{source}: concept word {word!r} is already loaded from another concept")
            # Check every word before adding any, so a refused concept leaves the pipeline unchanged.
            self.concepts.check(self.tokenizer, self.text_encoder, word, concept.embeddings[word])
        first = concept.words[0] if concept.words else Path(source).stem  # (a LoRA file without words: its name)
        name = name or re.sub(r"\W+", "_", first).strip("_") or f"concept{len(self.adapter_scales)}"
        if name in self.adapter_scales:
            raise MixOfShowError(f"{source}: adapter name {name!r} is already used; pass another name")

        for word in concept.words:
            self.concepts.add(self.tokenizer, self.text_encoder, word, concept.embeddings[word])
        for model, weights in ((self.text_encoder, text_encoder_lora), (self.unet, concept.unet_lora)):
            load_lora(model, weights, concept.rank, concept.alpha, name)
        self.adapter_scales[name] = float(scale)
        self._apply_adapters()
        return name

    def set_concept_scale(self, name: str, scale: float) -> None:
        """Change a loaded concept's LoRA scale."""
        if name not in self.adapter_scales:
            raise MixOfShowError(f"no concept adapter {name!r}; loaded: {list(self.adapter_scales)}")
        self.adapter_scales[name] = float(scale)
        self._apply_adapters()

    def _apply_adapters(self) -> None:
        for model in (self.text_encoder, self.unet):
            if lora_layers(model):
                activate(model, list(self.adapter_scales))
                for name, scale in self.adapter_scales.items():
                    set_lora_scale(model, name, scale)
                model.requires_grad_(False)

    def use_scheduler(self, name: str) -> None:
        """Switch the sampler: one of `SCHEDULERS` (ddim, dpm++, euler, euler_a, pndm)."""
        if name not in SCHEDULERS:
            raise MixOfShowError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
        # PNDM as Stable Diffusion runs it: PLMS steps only (the PRK warm-up needs >= 4 steps and adds UNet calls).
        overrides = {"skip_prk_steps": True} if name == "pndm" else {}
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config, **overrides)

    # -- sampling -------------------------------------------------------------------------------------------------

    def check_sampling_inputs(self, prompts: list[str], negatives: list[str], height: int, width: int, steps: int,
                              guidance_scale: float, regions: RegionPrompts | None = None,
                              conditions: Sequence[SpatialCondition] = ()) -> None:
        """Raise `MixOfShowError` naming the bad value before any model work."""
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for label, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise MixOfShowError(f"{label} must be a positive multiple of {multiple} for this model, got {value}")
        most = self.scheduler.config.num_train_timesteps
        if not isinstance(steps, int) or not 1 <= steps <= most:
            raise MixOfShowError(f"steps must be an integer from 1 to {most} (the scheduler's training timesteps), "
                                 f"got {steps}")
        if not math.isfinite(float(guidance_scale)):
            raise MixOfShowError(f"guidance must be a finite number, got {guidance_scale}")
        texts = [("prompt", p) for p in prompts] + [("negative_prompt", n) for n in negatives]
        if regions is not None:
            texts += [(f"regions[{i}].prompt", p) for i, p in enumerate(regions.prompts)]
            texts += [(f"regions[{i}].negative_prompt", n) for i, n in enumerate(regions.negative_prompts)]
            if tuple(regions.masks.shape[1:]) != (height, width):
                raise MixOfShowError(f"region masks are {tuple(regions.masks.shape[1:])} (height, width) but the "
                                     f"image is {(height, width)}: make them the image's size")
            for i, weight in enumerate(regions.adapter_weights):
                if not math.isfinite(float(weight)):
                    raise MixOfShowError(f"regions[{i}].adapter_weight must be a finite number, got {weight}")
        for label, text in texts:
            self.check_prompt_text(label, text)
        for condition in conditions:
            if not math.isfinite(float(condition.weight)):
                raise MixOfShowError(f"{condition.name}: weight must be a finite number, got {condition.weight}")
            if tuple(condition.image.shape[-2:]) != (height, width):
                raise MixOfShowError(f"{condition.name}: the condition image is {condition.image.shape[-1]}x"
                                     f"{condition.image.shape[-2]} but the image is {width}x{height}: resize it")

    def check_prompt_text(self, label: str, text: str) -> None:
        """Raise if a prompt uses unknown concept words or is longer than the text encoder reads."""
        try:
            self.concepts.check_prompt(text)
        except MixOfShowError as error:
            raise MixOfShowError(f"{label}: {error}") from None
        length = len(self.tokenizer(self.concepts.bind(text)).input_ids)
        if length > self.tokenizer.model_max_length:
            raise MixOfShowError(f"{label} is {length} tokens long but the text encoder reads "
                                 f"{self.tokenizer.model_max_length} (start and end included): shorten it")

    def layerwise_input_ids(self, prompts: list[str], negatives: list[str] | None) -> torch.Tensor:
        """Token ids of prompts (and negatives) once per cross-attention layer: `(L, B, T)` or `(L, 2B, T)` with the
        negatives first; L is 1 when no layer-wise word is used."""
        ids = self.concepts.layer_input_ids(self.tokenizer, prompts)
        if negatives is not None:
            negative_ids = self.concepts.layer_input_ids(self.tokenizer, negatives)
            layers = max(ids.shape[0], negative_ids.shape[0])
            ids = torch.cat([negative_ids.expand(layers, -1, -1), ids.expand(layers, -1, -1)], dim=1)
        return ids

    def encode_layerwise_prompt(self, prompts: list[str], negatives: list[str] | None) -> torch.Tensor:
        """Encode prompts (and negatives for classifier-free guidance) once per cross-attention layer.

        Returns:
            `(L, B, T, D)`, or `(L, 2B, T, D)` with the negatives first; L is 1 when no layer-wise word is used.
        """
        return encode_layerwise(self.text_encoder, self.layerwise_input_ids(prompts, negatives))

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, states: torch.Tensor, guidance_scale: float,
                      regional: RegionalAttention | None = None,
                      residuals: ConditionResiduals | None = None) -> torch.Tensor:
        """One UNet evaluation with classifier-free guidance; `states` from `encode_layerwise_prompt`, optional
        region prompts and spatial-condition residuals."""
        guided = guidance_scale > 1.0
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        kwargs = {LAYERWISE_KEY: states} if states.shape[0] > 1 else {}
        if regional is not None:
            kwargs[REGIONS_KEY] = regional
        if self._attention_recorder is not None:
            kwargs[RECORDER_KEY] = self._attention_recorder
        extra = residuals.unet_kwargs(model_input, t, states[0], guided) if residuals is not None else {}
        noise = self.unet(model_input, t, encoder_hidden_states=states[0], cross_attention_kwargs=kwargs or None,
                          **extra).sample
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        return noise

    @contextmanager
    def recording_attention(self, recorder: AttentionMapRecorder) -> Iterator[AttentionMapRecorder]:
        """While open, every UNet call of this pipeline adds its cross-attention maps of the recorder's token
        positions to `recorder.maps` (one `(B, HW, K)` entry per cross-attention layer and call; B is the UNet's
        batch: negatives first under guidance)."""
        self._attention_recorder = recorder
        try:
            yield recorder
        finally:
            self._attention_recorder = None

    def regional_attention(self, regions: RegionPrompts, batch: int, guided: bool, height: int,
                           width: int) -> RegionalAttention:
        """Region prompts encoded per layer like the global ones (negatives first under guidance), and their masks
        at the latent resolution."""
        encodings = [self.encode_layerwise_prompt([p] * batch, [n] * batch if guided else None)
                     for p, n in zip(regions.prompts, regions.negative_prompts)]
        layers = max(e.shape[0] for e in encodings)
        states = torch.stack([e.expand(layers, -1, -1, -1) for e in encodings])  # (R, L, B, T, D)
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        device = self._execution_device
        masks = F.interpolate(regions.masks[:, None].to(device, torch.float32), size=size, mode="area")[:, 0]
        return RegionalAttention(states.to(device, self.unet.dtype), masks, isolate=regions.isolate)

    def sample_layout(self, layout: Layout, conditions: Sequence[SpatialCondition] | None = None,
                      num_images: int = 1, output_type: str = "pil", progress: bool = True,
                      callback_on_step_end: Callable | None = None) -> StableDiffusionPipelineOutput:
        """Sample a layout: global prompt, regions, spatial conditions, size, steps, guidance, scheduler, seed.

        Args:
            layout: a `Layout` (`mixofshow.layout.load_layout`).
            conditions: already-loaded spatial conditions; default: load the layout's models (after every prompt
                has been checked against this model).
            num_images: images to sample.
            output_type: "pil", "np", "pt" or "latent".
            progress: show a progress bar.
            callback_on_step_end: called after each denoising step, as in `__call__` (not in detail passes).

        Regions with a `detail_prompt` are then finished by a detail pass each (`detail_regions`).
        """
        regions = RegionPrompts.from_layout(layout)
        self.check_sampling_inputs([layout.prompt], [layout.negative_prompt], layout.height, layout.width,
                                   layout.steps, layout.guidance, regions)
        if layout.scheduler:
            self.use_scheduler(layout.scheduler)
        if conditions is None:
            conditions = load_spatial_conditions(layout, self.unet.dtype)
        details = layout_details(layout)
        if details and output_type != "pil":
            raise MixOfShowError(f"the layout's detail passes finish PIL images; ask for output_type 'pil', not "
                                 f"{output_type!r}")
        for detail in details:
            self.check_prompt_text("a detail_prompt", detail.prompt)
        for condition in conditions:
            condition.model.to(self._execution_device)
        output = self(layout.prompt, layout.negative_prompt, height=layout.height, width=layout.width,
                      num_inference_steps=layout.steps, guidance_scale=layout.guidance, seed=layout.seed,
                      num_images_per_prompt=num_images, output_type=output_type, progress=progress, regions=regions,
                      conditions=conditions, callback_on_step_end=callback_on_step_end)
        if details:
            output.images = detail_regions(self, output.images, details, layout.detail_strength, layout.steps,
                                           layout.guidance, seed=layout.seed or 0, progress=progress)
        return output

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        regions: RegionPrompts | None = None,
        conditions: Sequence[SpatialCondition] = (),
        callback_on_step_end: Callable | None = None,
    ) -> StableDiffusionPipelineOutput:
        """Sample images.

        Args:
            prompt: prompt(s), concept words allowed.
            negative_prompt: negative prompt(s) for classifier-free guidance.
            height, width: image size in pixels (default: the UNet's sample size times the VAE factor).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight (<= 1 disables it).
            num_images_per_prompt: images per prompt.
            seed: seeds a CPU `torch.Generator`, so a seed gives the same image on every device.
            generator: a generator to use instead of `seed`.
            latents: initial noise `(B, C, h, w)` instead of drawing it.
            output_type: "pil", "np", "pt" or "latent".
            progress: show a progress bar.
            regions: region prompts with masks (regionally controllable sampling); the global prompt keeps the
                pixels outside every region.
            conditions: spatial conditions (T2I-Adapters, ControlNets) with their images and weights.
            callback_on_step_end: called after each denoising step as `callback(pipe, step_index, timestep,
                {"latents": latents})`, as in diffusers (`len(pipe.scheduler.timesteps)` steps in all); a returned
                dict's "latents" replace the latents; an exception raised there stops sampling.

        Returns:
            `StableDiffusionPipelineOutput` with `images`.
        """
        # 1. Check inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = negative_prompt or ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        negatives = negatives if len(negatives) == len(prompts) else [n for n in negatives for _ in
                                                                       range(num_images_per_prompt)]
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        self.check_sampling_inputs(prompts, negatives, height, width, num_inference_steps, guidance_scale, regions,
                                   conditions)
        device = self._execution_device

        # 2. Encode the prompts (and the region prompts) once per cross-attention layer; spatial conditions
        guided = guidance_scale > 1.0
        states = self.encode_layerwise_prompt(prompts, negatives if guided else None)
        states = states.to(device, self.unet.dtype)
        regional = self.regional_attention(regions, len(prompts), guided, height, width) if regions else None
        residuals = (ConditionResiduals(conditions, regions, height, width, len(prompts), device, self.unet.dtype)
                     if conditions else None)

        # 3. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 4. Initial noise, drawn on the CPU so a seed means the same image everywhere
        if latents is None:
            generator = generator or torch.Generator("cpu").manual_seed(0 if seed is None else seed)
            shape = (len(prompts), self.unet.config.in_channels, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = (latents.to(device) * self.scheduler.init_noise_sigma).to(self.unet.dtype)

        # 5. Denoising loop
        timesteps = self.progress_bar(self.scheduler.timesteps) if progress else self.scheduler.timesteps
        for i, t in enumerate(timesteps):
            noise = self.predict_noise(latents, t, states, guidance_scale, regional, residuals)
            latents = self.scheduler.step(noise, t, latents).prev_sample
            if callback_on_step_end is not None:
                latents = (callback_on_step_end(self, i, t, {"latents": latents}) or {}).get("latents", latents)

        # 6. Decode
        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=latents, nsfw_content_detected=None)
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=None)


def load_sampling_pipeline(model: str | None = None, base: str | None = None, concepts: Sequence = (),
                           scales: Sequence[float] | None = None, device: str = "cpu",
                           dtype: torch.dtype = torch.float32, texts: Sequence[str] = ()) -> MixOfShowPipeline:
    """A pipeline to sample from: a model folder (e.g. fused), or a base with concept files at given scales.

    Everything that can be checked before the model loads is: the choice of model, the scales, the concept files,
    and (with a base) that `texts` use only words those concept files define.

    Args:
        model: a model folder; or
        base: a base model (folder, single file or Hub id), with
        concepts: concept files (paths or `ConceptFile`s) at
        scales: their LoRA scales (one value for all; default 1.0).
        device: where it samples.
        dtype: the weights' dtype.
        texts: prompts to check against the concepts' words before the base loads.

    Returns:
        The pipeline on `device`, progress bars off.
    """
    concepts = list(concepts)
    if bool(model) == bool(base):
        raise MixOfShowError("give exactly one of --model DIR or --base B (with optional --concept files)")
    if model and concepts:
        raise MixOfShowError("--concept goes with --base; a --model folder already holds its concepts")
    scales = list(scales or [1.0])
    scales = scales * max(1, len(concepts)) if len(scales) == 1 else scales
    if len(scales) != max(1, len(concepts)):
        raise MixOfShowError(f"--scale has {len(scales)} values for {len(concepts)} --concept files")
    missing = [str(c) for c in concepts if not isinstance(c, ConceptFile) and not Path(c).is_file()]
    if missing:
        raise MixOfShowError(f"concept file(s) not found: {', '.join(missing)}")
    sources = [str(c) if not isinstance(c, ConceptFile) else f"concept {i}" for i, c in enumerate(concepts)]
    concepts = [c if isinstance(c, ConceptFile) else load_concept(c) for c in concepts]  # small: before the model
    if base:
        vocabulary = ConceptVocabulary(num_layers=1)
        vocabulary.tokens = {w: None for c in concepts for w in c.words}
        for text in texts:
            vocabulary.check_prompt(text)
    pipe = MixOfShowPipeline.from_base(model or base, dtype=dtype)
    for concept, scale, source in zip(concepts, scales, sources):
        pipe.load_concept(concept, scale=scale, source=source)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
