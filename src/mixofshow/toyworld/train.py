"""Training the toy world's base model and attribute classifier from scratch on rendered scenes.

Four stages, with a fixed seed: (a) the VAE (reconstruction + a small KL term), (b) the CLIP text encoder
(contrastive against a throw-away image tower, as CLIP was trained), (c) the UNet (DDPM epsilon objective with
min-SNR weighting, the text encoder trained on with it, 10% empty captions for classifier-free guidance, EMA
weights), (d) the attribute classifier on object crops, concepts included. The result is a diffusers pipeline
folder (fp16 weights, loading as fp32) plus `classifier.safetensors`, `training_report.json` and `samples.png`.

Run it with `python scripts/train_toyworld.py --device cuda --minutes 3.5`; `--smoke` runs a few steps on tiny data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..attention import REGIONS_KEY, RegionalAttention, install_processors
from .classifier import (
    CLASSIFIER_FILE,
    CROP_SIZE,
    OBJECT_CROP_SCALE,
    AttributeClassifier,
    load_classifier,
    save_classifier,
)
from .dataset import LABELS, RenderedSet, crop_boxes, images_to_tensor, render_set
from .evaluate import box_pixels, column_bands
from .models import load_toyworld_pipeline, toy_components, toy_pipeline, toyworld_asset_folder

logger = logging.getLogger(__name__)

STAGES = ("vae", "text_encoder", "unet", "classifier")
SAMPLE_PROMPTS = (
    "a red circle in the center, white background",
    "a large blue striped star on the left, beige background",
    "a yellow heart with a crown at the top right, navy background",
    "a green dotted square with a hat on the left and a small pink triangle on the right, gray background",
    "a purple checked diamond with glasses at the bottom, mint background",
    "a large orange triangle with a bow on the right, lavender background",
    ("a small brown circle on the left and a small red star in the center and a small blue heart on the right, "
     "white background"),
    "a blue circle with a hat on the left and a red square on the right, beige background",
)


@dataclass(frozen=True)
class ToyWorldTrainConfig:
    """Everything `train_toyworld` does; the defaults are the ~3.5-minute single-GPU run."""

    out: str = field(default="", metadata={"help": "output folder (default: the package's assets/toyworld)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    seed: int = field(default=0, metadata={"help": "seeds the data, the initial weights and the training"})
    init: str = field(default="", metadata={"help": "continue from this trained toy-world folder's weights "
                                                    "(its classifier too, when it has one)"})
    minutes: float | None = field(default=None, metadata={"help": "wall-clock budget for the whole run; stages "
                                                                  "stop at their share of it or their step count"})
    scenes: int = field(default=60000, metadata={"help": "base-world training scenes"})
    concept_scenes: int = field(default=8000, metadata={"help": "scenes with concepts (classifier only)"})
    eval_scenes: int = field(default=1000, metadata={"help": "held-out scenes of each kind for the report"})
    workers: int = field(default=0, metadata={"help": "rendering processes (0: one per CPU core, at most 16)"})
    vae_steps: int = field(default=1500, metadata={"help": "VAE steps"})
    vae_batch: int = field(default=128, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak learning rate"})
    vae_kl: float = field(default=1e-6, metadata={"help": "VAE KL weight"})
    vae_object_weight: float = field(default=4.0, metadata={"help": "extra reconstruction weight of pixels unlike the "
                                                                     "background (objects are small)"})
    vae_decoder_only: bool = field(default=False, metadata={"help": "train the VAE decoder only (keeps the latent "
                                                                    "space, so a UNet trained on it stays valid)"})
    text_steps: int = field(default=600, metadata={"help": "text-encoder (contrastive) steps"})
    text_batch: int = field(default=512, metadata={"help": "text-encoder batch size"})
    text_lr: float = field(default=1e-3, metadata={"help": "text-encoder peak learning rate"})
    unet_steps: int = field(default=6000, metadata={"help": "UNet steps"})
    unet_batch: int = field(default=256, metadata={"help": "UNet batch size"})
    unet_lr: float = field(default=5e-4, metadata={"help": "UNet peak learning rate"})
    unet_text_lr: float = field(default=2e-4, metadata={"help": "text-encoder learning rate while the UNet trains "
                                                                "(0: frozen text encoder)"})
    unet_regional: float = field(
        default=0.0, metadata={"help": "share of UNet steps on two- or three-object scenes with each object's own "
                                       "caption attending from its column band, as in regional sampling"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for guidance)"})
    snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR loss weighting gamma (0: plain MSE)"})
    ema_decay: float = field(default=0.999, metadata={"help": "UNet EMA decay (0: no EMA)"})
    classifier_steps: int = field(default=1500, metadata={"help": "classifier steps"})
    classifier_batch: int = field(default=256, metadata={"help": "classifier batch size"})
    classifier_lr: float = field(default=2e-3, metadata={"help": "classifier peak learning rate"})
    classifier_reconstructed: float = field(
        default=0.5, metadata={"help": "share of classifier crops cut from VAE reconstructions of the scenes (as "
                                       "generated images are decoded), the rest from clean renders"})
    shares: tuple[float, float, float, float] = field(
        default=(0.17, 0.08, 0.6, 0.15), metadata={"help": "time shares of the four stages under --minutes"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 on cuda), bf16 or no"})
    sample_steps: int = field(default=25, metadata={"help": "sampling steps for samples.png (0: none)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})

    def __post_init__(self) -> None:
        for name in ("scenes", "concept_scenes", "eval_scenes", "vae_batch", "text_batch", "unet_batch",
                     "classifier_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be at least 1.")
        for name in ("vae_steps", "text_steps", "unet_steps", "classifier_steps", "workers", "sample_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)!r} must be at least 0.")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"minutes {self.minutes!r} must be positive.")
        if len(self.shares) != len(STAGES) or min(self.shares) < 0 or sum(self.shares) <= 0:
            raise ValueError(f"shares {self.shares!r} must be {len(STAGES)} non-negative numbers, not all 0.")
        if not 0 <= self.unet_regional <= 1:
            raise ValueError(f"unet_regional {self.unet_regional!r} must be in [0, 1].")
        if not 0 <= self.classifier_reconstructed <= 1:
            raise ValueError(f"classifier_reconstructed {self.classifier_reconstructed!r} must be in [0, 1].")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not one of auto, bf16, no.")

    @classmethod
    def smoke(cls, **overrides) -> ToyWorldTrainConfig:
        """A few steps on tiny data: checks the whole run end to end in seconds."""
        values = {"scenes": 48, "concept_scenes": 32, "eval_scenes": 16, "workers": 1, "sample_steps": 2,
                  "ema_decay": 0.0, "vae_batch": 4, "text_batch": 4, "unet_batch": 4, "classifier_batch": 8}
        values.update({f"{stage}_steps": 2 for stage in ("vae", "text", "unet", "classifier")})
        values.update(overrides)
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------
# The training loop shared by every stage.


@dataclass
class StageResult:
    """What one stage did: steps run, seconds (wall clock), seconds per step, and its last logged losses."""

    steps: int
    seconds: float
    seconds_per_step: float
    losses: dict[str, float]


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% as `progress` goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _run_stage(name: str, steps: int, seconds: float | None, optimizer: torch.optim.Optimizer,
               step_fn: Callable[[int], dict[str, torch.Tensor]], quiet: bool,
               after_step: Callable[[int], None] | None = None) -> StageResult:
    """Run `step_fn` until `steps` steps or `seconds` have passed; the learning rate follows whichever is nearer."""
    for group in optimizer.param_groups:
        group.setdefault("peak_lr", group["lr"])
    warmup = max(1, min(200, steps // 10))
    start = time.perf_counter()
    step, logged = 0, {}
    with tqdm(total=steps, desc=name, disable=quiet, dynamic_ncols=True) as bar:
        while step < steps:
            elapsed = time.perf_counter() - start
            if seconds is not None and elapsed >= seconds:
                logger.info("%s: time share (%.0f s) used up after %d of %d steps", name, seconds, step, steps)
                break
            progress = max(step / steps, elapsed / seconds if seconds else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * _lr_factor(progress, step, warmup)
            losses = step_fn(step)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1
            if step % 25 == 0 or step == steps:  # .item() waits for the device: only now and then
                logged = {k: float(v.detach()) for k, v in losses.items()}
                if not math.isfinite(sum(logged.values())):
                    raise FloatingPointError(f"{name}: loss became {logged} at step {step}; lower the learning rate.")
                bar.set_postfix({k: f"{v:.4f}" for k, v in logged.items()})
            bar.update(1)
    if not logged and step:
        logged = {k: float(v.detach()) for k, v in losses.items()}
    total = time.perf_counter() - start
    return StageResult(step, total, total / max(step, 1), logged)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------------------------------------------------------
# (a) VAE.


def train_vae(vae, images: torch.Tensor, config: ToyWorldTrainConfig, seconds: float | None, amp: bool,
              generator: torch.Generator) -> StageResult:
    """Reconstruction (L1 + MSE, pixels unlike the background weighted 1 + `vae_object_weight`) plus `vae_kl` x KL
    on random horizontally flipped images; only the decoder learns when `vae_decoder_only`.

    Args:
        vae: The `AutoencoderKL`, trained in place.
        images: (N, 3, H, W) uint8 on the training device.
        config: Steps, batch size, learning rate, KL weight.
        seconds: Time budget, or None.
        amp: bf16 autocast.
        generator: A generator on the training device.
    """
    vae.train()
    if config.vae_decoder_only:
        vae.requires_grad_(False)
        for part in (vae.decoder, vae.post_quant_conv):
            part.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = torch.randint(len(images), (config.vae_batch,), device=images.device, generator=generator)
        x = images[index].float() / 127.5 - 1  # (B, 3, H, W)
        flip = torch.rand(len(x), device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with _autocast(x.device, amp), torch.set_grad_enabled(not config.vae_decoder_only):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=generator)
        with _autocast(x.device, amp):
            reconstruction = vae.decode(z).sample.float()
        # Scenes have a flat background (the corner pixel's colour): weight the pixels that differ from it.
        unlike = (x - x[..., :1, :1]).abs().sum(1, keepdim=True) > 0.1  # (B, 1, H, W)
        weight = 1 + config.vae_object_weight * unlike
        error = reconstruction - x
        losses = {"l1": (weight * error.abs()).mean(), "mse": (weight * error.pow(2)).mean()}
        if not config.vae_decoder_only:
            losses["kl"] = config.vae_kl * posterior.kl().float().mean()
        return losses

    result = _run_stage("vae", config.vae_steps, seconds, optimizer, step_fn, config.quiet)
    vae.eval()
    return result


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, amp: bool, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of uint8 images (N, 3, H, W), unscaled, in float32."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        x = images[start:start + batch].float() / 127.5 - 1
        with _autocast(x.device, amp):
            posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------------------------
# (b) Text encoder.


class ImageTower(nn.Module):
    """CLIP's image side for stage (b): a small CNN from 64x64 images to the text encoder's width; then discarded."""

    def __init__(self, out_dim: int, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for c_out in (width, 2 * width, 4 * width, 4 * width):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, 1, 1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, out_dim)


def tokenize(tokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    """(N, model_max_length) input ids, padded as Stable Diffusion pads them."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def train_text_encoder(text_encoder, images: torch.Tensor, input_ids: torch.Tensor, config: ToyWorldTrainConfig,
                       seconds: float | None, amp: bool, generator: torch.Generator) -> StageResult:
    """CLIP's symmetric contrastive loss between captions (the pooled EOS state, projected) and images.

    Args:
        text_encoder: The `CLIPTextModel`, trained in place.
        images: (N, 3, H, W) uint8 on the training device.
        input_ids: (N, 77) token ids of the images' captions.
        config: Steps, batch size, learning rate.
        seconds: Time budget, or None.
        amp: bf16 autocast.
        generator: A generator on the training device.
    """
    device = images.device
    hidden = text_encoder.config.hidden_size
    tower = ImageTower(hidden).to(device)
    projection = nn.Linear(hidden, hidden, bias=False).to(device)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    with torch.no_grad():
        tower(torch.zeros(1, *images.shape[1:], device=device))  # materialise the lazy layer
    text_encoder.train()
    optimizer = torch.optim.AdamW([
        {"params": text_encoder.parameters(), "weight_decay": 0.0},  # no decay: unused vocabulary rows stay put
        {"params": [*tower.parameters(), *projection.parameters()], "weight_decay": 0.01},
        {"params": [log_scale], "weight_decay": 0.0},
    ], lr=config.text_lr, betas=(0.9, 0.98))
    batch = min(config.text_batch, len(images))

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = torch.randperm(len(images), device=device, generator=generator)[:batch]
        x = images[index].float() / 127.5 - 1
        with _autocast(device, amp):
            text = projection(text_encoder(input_ids[index]).pooler_output)  # (B, hidden)
            image = tower(x)  # (B, hidden)
        text, image = F.normalize(text.float(), dim=-1), F.normalize(image.float(), dim=-1)
        logits = log_scale.clamp(max=math.log(100)).exp() * image @ text.T  # (B, B)
        target = torch.arange(len(x), device=device)
        return {"contrastive": (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2}

    result = _run_stage("text_encoder", config.text_steps, seconds, optimizer, step_fn, config.quiet)
    text_encoder.eval()
    return result


# ---------------------------------------------------------------------------------------------------------------
# (c) UNet.


@dataclass
class RegionalScenes:
    """Scenes of one multi-object layout, for UNet steps with regional prompts.

    Args:
        scenes: (S,) indices of the scenes with this layout.
        region_ids: (S, R, 77) token ids of each object's own caption.
        masks: (R, h, w) the objects' column bands at the latent resolution.
    """

    scenes: torch.Tensor
    region_ids: torch.Tensor
    masks: torch.Tensor


def regional_scenes(rendered: RenderedSet, tokenizer, latent_size: tuple[int, int], device: torch.device
                    ) -> list[RegionalScenes]:
    """The two- and three-object layouts of a rendered set (objects in column order, as `random_scene` makes
    them), each with its scenes, region prompts and band masks (pixel bands area-downsampled, as the pipeline does)."""
    size = rendered.images.shape[1]
    layouts = []
    for columns in sorted({c for c in rendered.object_columns if len(c) > 1}):
        scenes = [i for i, c in enumerate(rendered.object_columns) if c == columns]
        ids = tokenize(tokenizer, [text for i in scenes for text in rendered.object_captions[i]], device)
        masks = torch.zeros(len(columns), 1, size, size)
        for index, band in enumerate(column_bands(columns)):
            x0, y0, x1, y1 = box_pixels(band, size)
            masks[index, :, y0:y1, x0:x1] = 1.0
        masks = F.interpolate(masks, size=latent_size, mode="area")[:, 0].to(device)
        layouts.append(RegionalScenes(torch.tensor(scenes, device=device), ids.view(len(scenes), len(columns), -1),
                                      masks))
    return layouts


def train_unet(unet, text_encoder, scheduler_config, latent_mean: torch.Tensor, latent_std: torch.Tensor,
               input_ids: torch.Tensor, empty_ids: torch.Tensor, config: ToyWorldTrainConfig, seconds: float | None,
               amp: bool, generator: torch.Generator, layouts: list[RegionalScenes] | None = None) -> StageResult:
    """DDPM epsilon-prediction training on cached (scaled) VAE posteriors.

    The text encoder learns on with the UNet at `unet_text_lr` (its token states are what the UNet reads; the
    contrastive stage only shapes its pooled output), or stays frozen when that is 0. A `unet_regional` share of
    the steps draws one of `layouts` and lets each object's own caption condition its band, through the same
    attention processor regional sampling uses: a model trained on whole-scene captions alone may use
    cross-attention non-locally (objects then vanish from regions with their own prompts).

    Args:
        unet: The `UNet2DConditionModel`, trained in place; ends with its EMA weights when `ema_decay` > 0.
        text_encoder: The `CLIPTextModel`, trained in place too unless `unet_text_lr` is 0 (EMA weights likewise).
        scheduler_config: The pipeline scheduler's config (the noise schedule).
        latent_mean: (N, 4, h, w) scaled posterior means.
        latent_std: (N, 4, h, w) scaled posterior standard deviations.
        input_ids: (N, 77) caption token ids.
        empty_ids: (77,) token ids of the empty caption (used with probability `caption_dropout`).
        config: Steps, batch size, learning rate, dropout, SNR gamma, EMA decay.
        seconds: Time budget, or None.
        amp: bf16 autocast.
        generator: A generator on the training device.
        layouts: Multi-object layouts for the regional steps (`regional_scenes`); needed when `unet_regional` > 0.
    """
    device = latent_mean.device
    layouts = layouts if config.unet_regional > 0 else None
    if config.unet_regional > 0 and not layouts:
        raise ValueError("unet_regional > 0 needs scenes with two or three objects.")
    schedule = random.Random(config.seed)  # which steps are regional (host-side: no device sync)
    original_processors = unet.attn_processors
    if layouts:
        install_processors(unet)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1 - alphas_cumprod)  # (T,)
    joint = config.unet_text_lr > 0
    text_encoder.requires_grad_(joint)
    text_encoder.train(joint)
    unet.train()
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = list(text_encoder.parameters()) if joint else []
    params = unet_params + text_params
    groups = [{"params": unet_params, "lr": config.unet_lr, "weight_decay": 0.01}]
    if joint:  # no decay: unused vocabulary rows stay put
        groups.append({"params": text_params, "lr": config.unet_text_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params] if config.ema_decay > 0 else None

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        layout = schedule.choice(layouts) if layouts and schedule.random() < config.unet_regional else None
        if layout is None:
            index = torch.randint(len(latent_mean), (config.unet_batch,), device=device, generator=generator)
        else:
            pick = torch.randint(len(layout.scenes), (config.unet_batch,), device=device, generator=generator)
            index = layout.scenes[pick]
        eps = torch.randn(latent_mean[index].shape, device=device, generator=generator)
        latents = latent_mean[index] + latent_std[index] * eps  # a posterior sample, (B, 4, h, w)
        ids = input_ids[index]
        if layout is None:
            drop = torch.rand(len(ids), device=device, generator=generator) < config.caption_dropout
            ids = torch.where(drop[:, None], empty_ids[None], ids)
        noise = torch.randn(latents.shape, device=device, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(ids),), device=device,
                                  generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(joint), _autocast(device, amp):
            states = text_encoder(ids)[0]  # (B, 77, hidden)
            if layout is not None:
                region_ids = layout.region_ids[pick]  # (B, R, 77)
                region_states = text_encoder(region_ids.flatten(0, 1))[0].unflatten(0, region_ids.shape[:2])
        kwargs = None
        if layout is not None:  # (R, 1, B, T, D): every layer reads the same encoding
            regional = RegionalAttention(region_states.transpose(0, 1)[:, None], layout.masks, trainable=True)
            kwargs = {REGIONS_KEY: regional}
        with _autocast(device, amp):
            prediction = unet(noisy, timesteps, states, cross_attention_kwargs=kwargs).sample.float()
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if config.snr_gamma > 0:
            s = snr[timesteps]
            per_sample = per_sample * torch.clamp(s, max=config.snr_gamma) / s
        return {"mse": per_sample.mean()}

    def after_step(step: int) -> None:
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)

    try:
        result = _run_stage("unet", config.unet_steps, seconds, optimizer, step_fn, config.quiet, after_step)
    finally:
        unet.set_attn_processor(original_processors)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return result


# ---------------------------------------------------------------------------------------------------------------
# (d) Classifier.


def _classifier_crops(images: torch.Tensor, boxes: torch.Tensor, scenes: torch.Tensor, index: torch.Tensor,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Crops of objects `index` (boxes[index], in images[scenes]): random scale, shift, blur and noise when
    `generator` is given."""
    x = images[scenes].float() / 127.5 - 1
    if generator is None:
        return crop_boxes(x, boxes[index], CROP_SIZE, scale=OBJECT_CROP_SCALE)
    n, device = len(index), images.device
    scale = 1.1 + 0.8 * torch.rand(n, device=device, generator=generator)
    shift = (torch.rand(n, 2, device=device, generator=generator) - 0.5) * 0.24
    crops = crop_boxes(x, boxes[index], CROP_SIZE, scale=scale, shift=shift)
    blur = torch.rand(n, device=device, generator=generator) < 0.3  # like a blurry generated image
    soft = F.interpolate(F.interpolate(crops, scale_factor=0.5, mode="bilinear", antialias=True),
                         size=crops.shape[-2:], mode="bilinear")
    crops = torch.where(blur[:, None, None, None], soft, crops)
    return crops + 0.03 * torch.randn(crops.shape, device=device, generator=generator)


def train_classifier(classifier: AttributeClassifier, images: torch.Tensor, boxes: torch.Tensor,
                     labels: torch.Tensor, config: ToyWorldTrainConfig, seconds: float | None, amp: bool,
                     generator: torch.Generator, reconstructed: torch.Tensor | None = None) -> StageResult:
    """Cross-entropy on every head of `LABELS`, on augmented object crops.

    Args:
        classifier: Trained in place.
        images: (N, 3, H, W) uint8 on the training device.
        reconstructed: The same scenes through the VAE, or None; a `config.classifier_reconstructed` share of the
            crops is cut from them.
        boxes: (M, 4) object boxes.
        labels: (M, 1 + heads) scene index, then one label per head.
        config: Steps, batch size, learning rate.
        seconds: Time budget, or None.
        amp: bf16 autocast.
        generator: A generator on the training device.
    """
    classifier.train()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.classifier_lr, weight_decay=0.01)
    heads = list(classifier.heads)
    sources = images if reconstructed is None else torch.cat([images, reconstructed])

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        index = torch.randint(len(boxes), (config.classifier_batch,), device=images.device, generator=generator)
        scenes = labels[index, 0]
        if reconstructed is not None:
            decoded = torch.rand(len(index), device=images.device, generator=generator)
            scenes = scenes + len(images) * (decoded < config.classifier_reconstructed)
        crops = _classifier_crops(sources, boxes, scenes, index, generator)
        with _autocast(images.device, amp):
            logits = classifier(crops)
        return {name: F.cross_entropy(logits[name].float(), labels[index, 1 + i]) for i, name in enumerate(heads)}

    result = _run_stage("classifier", config.classifier_steps, seconds, optimizer, step_fn, config.quiet)
    classifier.eval()
    return result


@torch.no_grad()
def classifier_accuracy(classifier: AttributeClassifier, images: torch.Tensor, boxes: torch.Tensor,
                        labels: torch.Tensor, batch: int = 1024) -> dict[str, float]:
    """Accuracy per head on every object of a rendered set (crop scale `OBJECT_CROP_SCALE`, no augmentation)."""
    correct = {name: 0 for name in classifier.heads}
    for start in range(0, len(boxes), batch):
        index = torch.arange(start, min(start + batch, len(boxes)), device=images.device)
        logits = classifier(_classifier_crops(images, boxes, labels[index, 0], index, None))
        for i, name in enumerate(classifier.heads):
            correct[name] += int((logits[name].argmax(dim=1) == labels[index, 1 + i]).sum())
    return {name: count / max(len(boxes), 1) for name, count in correct.items()}


# ---------------------------------------------------------------------------------------------------------------
# The whole run.


def _device_tensors(rendered: RenderedSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (images_to_tensor(rendered.images, device), torch.from_numpy(rendered.boxes).to(device),
            torch.from_numpy(rendered.labels).to(device))


@torch.no_grad()
def _reconstruct(vae, images: torch.Tensor, amp: bool, batch: int = 256) -> tuple[torch.Tensor, float]:
    """VAE reconstructions of uint8 images (as uint8) and their PSNR in dB."""
    outputs, squared_error = [], 0.0
    for start in range(0, len(images), batch):
        x = images[start:start + batch].float() / 127.5 - 1
        with _autocast(images.device, amp):
            reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        squared_error += float(((reconstruction - x) / 2).pow(2).sum())
        outputs.append(((reconstruction + 1) * 127.5).round().to(torch.uint8))
    mse = squared_error / images.numel()
    return torch.cat(outputs), 10 * math.log10(1 / max(mse, 1e-12))


def _sample_grid(components: dict, prompts: tuple[str, ...], steps: int, seed: int) -> Image.Image:
    """One 64x64 sample per prompt (guidance 5), side by side."""
    pipe = toy_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(list(prompts), height=64, width=64, num_inference_steps=steps, guidance_scale=5.0,
                  generator=generator).images
    grid = Image.new("RGB", (64 * len(images), 64))
    for i, image in enumerate(images):
        grid.paste(image, (64 * i, 0))
    return grid


def _save_pipeline(components: dict, folder: Path) -> None:
    """Save the pipeline, then store its weights in fp16 (configs unchanged, so it still loads as float32)."""
    toy_pipeline(components).save_pretrained(folder)
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata=metadata)


def _weights_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6


class _Budget:
    """Splits the seconds left of `--minutes` among the stages still to run, by their shares."""

    def __init__(self, config: ToyWorldTrainConfig, start: float, reserve: float = 15.0):
        self.config, self.start, self.reserve = config, start, reserve

    def seconds(self, stage: str) -> float | None:
        if self.config.minutes is None:
            return None
        left = self.config.minutes * 60 - (time.perf_counter() - self.start) - self.reserve
        index = STAGES.index(stage)
        if self.config.shares[index] == 0:
            return 0.0  # the stage is skipped
        share = self.config.shares[index] / max(sum(self.config.shares[index:]), 1e-9)
        return max(left * share, 1.0)


def train_toyworld(config: ToyWorldTrainConfig) -> Path:
    """Train the toy base model and the attribute classifier; write them to `config.out` (replacing it).

    Returns:
        The output folder: a diffusers pipeline folder with `classifier.safetensors`, `training_report.json`
        and `samples.png`.
    """
    start = time.perf_counter()
    out = Path(config.out) if config.out else toyworld_asset_folder()
    device = torch.device(config.device)
    amp = device.type == "cuda" and config.mixed_precision in ("auto", "bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    budget = _Budget(config, start)
    workers = config.workers or min(16, os.cpu_count() or 1)
    report: dict = {"config": dataclasses.asdict(config), "device": str(device), "stages": {}}

    trained = load_toyworld_pipeline(config.init) if config.init else None  # a bad --init fails before any work

    # 1. Render the data: the base world (training, held out) and scenes with concepts (classifier only).
    rendering = time.perf_counter()
    base = render_set(config.scenes, config.seed, "base", workers=workers)
    concepts = render_set(config.concept_scenes, config.seed, "concepts", workers=workers)
    held_base = render_set(config.eval_scenes, config.seed + 1, "base", workers=workers)
    held_concepts = render_set(config.eval_scenes, config.seed + 1, "concepts", workers=workers)
    report["render_seconds"] = time.perf_counter() - rendering
    logger.info("Rendered the data in %.1f s", report["render_seconds"])

    # 2. Build the untrained components and move the data to the device.
    components = toy_components(config.seed)
    vae, text_encoder, unet, tokenizer = (components[k] for k in ("vae", "text_encoder", "unet", "tokenizer"))
    if trained is not None:
        for name in ("vae", "text_encoder", "unet"):
            components[name].load_state_dict(getattr(trained, name).state_dict())
        logger.info("Continuing from the weights in %s", config.init)
    for model in (vae, text_encoder, unet):
        model.to(device)
    images = images_to_tensor(base.images, device)
    input_ids = tokenize(tokenizer, base.captions, device)
    empty_ids = tokenize(tokenizer, [""], device)[0]
    generator = torch.Generator(device).manual_seed(config.seed)

    # 3. (a) VAE, then its scaling factor from the training latents.
    result = train_vae(vae, images, config, budget.seconds("vae"), amp, generator)
    vae.requires_grad_(False)
    latent_mean, latent_std = encode_latents(vae, images, amp)
    scaling = 1.0 / float(latent_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    held_images = images_to_tensor(held_base.images, device)
    _, psnr = _reconstruct(vae, held_images, amp)
    report["stages"]["vae"] = {**dataclasses.asdict(result), "held_out_psnr_db": psnr, "scaling_factor": scaling}
    logger.info("VAE: %d steps, %.3f s/step, held-out PSNR %.2f dB", result.steps, result.seconds_per_step, psnr)

    # 4. (b) Text encoder.
    result = train_text_encoder(text_encoder, images, input_ids, config, budget.seconds("text_encoder"), amp,
                                generator)
    report["stages"]["text_encoder"] = dataclasses.asdict(result)
    logger.info("Text encoder: %d steps, %.3f s/step", result.steps, result.seconds_per_step)

    # 5. (c) UNet on scaled latents.
    layouts = regional_scenes(base, tokenizer, latent_mean.shape[-2:], device) if config.unet_regional else None
    result = train_unet(unet, text_encoder, components["scheduler"].config, latent_mean * scaling,
                        latent_std * scaling, input_ids, empty_ids, config, budget.seconds("unet"), amp, generator,
                        layouts)
    report["stages"]["unet"] = dataclasses.asdict(result)
    logger.info("UNet: %d steps, %.3f s/step", result.steps, result.seconds_per_step)
    del latent_mean, latent_std

    # 6. (d) Classifier on base and concept objects, scored on held-out renders and their VAE reconstructions.
    concept_images, concept_boxes, concept_labels = _device_tensors(concepts, device)
    all_images = torch.cat([images, concept_images])
    concept_labels = concept_labels.clone()
    concept_labels[:, 0] += len(images)
    all_boxes = torch.cat([torch.from_numpy(base.boxes).to(device), concept_boxes])
    all_labels = torch.cat([torch.from_numpy(base.labels).to(device), concept_labels])
    classifier = AttributeClassifier(LABELS)
    if config.init and (Path(config.init) / CLASSIFIER_FILE).is_file():
        classifier = load_classifier(Path(config.init) / CLASSIFIER_FILE)
    classifier = classifier.to(device)
    seconds = budget.seconds("classifier")
    reconstructed = None
    if config.classifier_reconstructed > 0 and seconds != 0 and config.classifier_steps:
        reconstructed, _ = _reconstruct(vae, all_images, amp)
    result = train_classifier(classifier, all_images, all_boxes, all_labels, config, seconds, amp, generator,
                              reconstructed)
    del reconstructed
    accuracy = {}
    for name, held in (("base", held_base), ("concepts", held_concepts)):
        held_images_d, held_boxes, held_labels = _device_tensors(held, device)
        accuracy[name] = classifier_accuracy(classifier, held_images_d, held_boxes, held_labels)
        reconstructed, _ = _reconstruct(vae, held_images_d, amp)
        accuracy[f"{name}_vae_reconstructed"] = classifier_accuracy(classifier, reconstructed, held_boxes,
                                                                    held_labels)
    report["stages"]["classifier"] = {**dataclasses.asdict(result), "held_out_accuracy": accuracy}
    logger.info("Classifier: %d steps, %.3f s/step, held-out accuracy %s", result.steps, result.seconds_per_step,
                json.dumps(accuracy["base"]))

    # 7. Write everything next to `out`, then swap it into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for model in (vae, text_encoder, unet):
            model.to("cpu")
        _save_pipeline(components, temporary)
        save_classifier(classifier.to("cpu"), temporary / CLASSIFIER_FILE)
        if config.sample_steps:
            _sample_grid(components, SAMPLE_PROMPTS, config.sample_steps, config.seed).save(temporary / "samples.png")
        report["weights_megabytes"] = _weights_megabytes(temporary)
        report["total_seconds"] = time.perf_counter() - start
        (temporary / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            previous = out.with_name(f".{out.name}.previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(out, previous)
            os.replace(temporary, out)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    logger.info("Wrote %s (%.1f MB of weights) in %.0f s", out, report["weights_megabytes"], report["total_seconds"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = ToyWorldTrainConfig()
    for f in dataclasses.fields(ToyWorldTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "shares":
            parser.add_argument(flag, type=float, nargs=len(STAGES), default=None, help=f.metadata["help"] +
                                f" (default: {' '.join(map(str, default))})")
        else:
            kind = float if f.name == "minutes" else type(default)
            parser.add_argument(flag, type=kind, default=None, help=f.metadata["help"] + f" (default: {default})")
    parser.add_argument("--steps", type=int, default=None, help="steps of every stage (a per-stage flag wins)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny data (checks the run end to end)")
    return parser


def config_from_args(argv: list[str] | None = None) -> ToyWorldTrainConfig:
    """The `ToyWorldTrainConfig` for command-line arguments (flags override `--smoke`, which overrides defaults)."""
    args = vars(_parser().parse_args(argv))
    smoke, steps = args.pop("smoke"), args.pop("steps")
    values = {k: v for k, v in args.items() if v is not None and v is not False}
    if "shares" in values:
        values["shares"] = tuple(values["shares"])
    if steps is not None:
        for stage in ("vae", "text", "unet", "classifier"):
            values.setdefault(f"{stage}_steps", steps)
    return ToyWorldTrainConfig.smoke(**values) if smoke else ToyWorldTrainConfig(**values)


def main(argv: list[str] | None = None) -> Path:
    """`python scripts/train_toyworld.py [--device cuda] [--minutes 3.5] [--steps N] [--smoke] [--out DIR]`."""
    config = config_from_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if config.quiet else logging.INFO, format="%(message)s")
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    return train_toyworld(config)
