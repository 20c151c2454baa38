"""The toy world's sketch condition: outline drawings of a scene's shapes, and a T2I-Adapter trained to follow them.

Mix-of-Show's regionally controllable sampling pairs region prompts with a spatial condition (a keypose or sketch
through T2I-Adapter): the condition fixes where each subject is and how large, the region prompts say who it is.

The sketch of a scene is the one-pixel outline of every object's class shape (circle, star, ...), drawn without
pattern, accessory or concept details: it says where and what kind of object, never which concept. The adapter
learns on base-world scenes with the base model frozen (`scripts/train_toy_sketch_adapter.py`, about 10 minutes on
2 CPU cores, written into the toy folder); with the defaults it lowers the base model's held-out loss from 0.058 to
0.034. It is not shipped: it would take the toy folder past its 20 MB budget, and it does not help three-region
binding (`benchmarks/quality.py --sketch`, session 17: it does not bring back a concept whose region stays empty, and
at weight 1 it erases the concepts' details; benchmarks/results/2026-12-07-session17-toyworld.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, T2IAdapter
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..models import load_base_components
from .models import toyworld_asset_folder, vae_factor
from .render import Scene, caption, random_scene, render, render_with_masks

logger = logging.getLogger(__name__)

SKETCH_ADAPTER_FOLDER = "sketch_adapter"


def sketch(scene: Scene, size: int = 64) -> np.ndarray:
    """`(size, size)` float32 in {0, 1}: the outline (1 px) of each object's class shape, white on black."""
    plain = tuple(replace(obj, pattern="plain", accessory="none", emblem=None, extra=None) for obj in scene.objects)
    _, masks = render_with_masks(Scene(scene.background, plain), size)
    lines = np.zeros((size, size), dtype=bool)
    for mask in masks:
        padded = np.pad(mask, 1)
        inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
        lines |= mask & ~inner
    return lines.astype(np.float32)


def sketch_tensor(scene: Scene, size: int = 64) -> torch.Tensor:
    """The sketch as a T2I-Adapter input, `(1, 1, size, size)`."""
    return torch.from_numpy(sketch(scene, size))[None, None]


def new_sketch_adapter(unet, vae) -> T2IAdapter:
    """An untrained one-channel T2I-Adapter whose features fit `unet`'s down blocks: their channels, and their
    resolutions (the first at the latent size: the image is unshuffled by the VAE's factor)."""
    return T2IAdapter(in_channels=1, channels=list(unet.config.block_out_channels), num_res_blocks=1,
                      downscale_factor=vae_factor(vae), adapter_type="full_adapter")


def load_sketch_adapter(folder: str | Path) -> T2IAdapter | None:
    """The sketch adapter of a toy-world folder (float32, eval mode), or None when the folder has none."""
    path = Path(folder) / SKETCH_ADAPTER_FOLDER
    if not (path / "config.json").is_file():
        return None
    return T2IAdapter.from_pretrained(path, torch_dtype=torch.float32).eval()


def cubic_timesteps(count: int, total_steps: int, generator: torch.Generator) -> torch.Tensor:
    """T2I-Adapter's cubic timestep sampling, t = (1 - u^3) T: the noisy early steps, where layout is decided,
    drawn most often."""
    u = torch.rand(count, generator=generator)
    return ((1 - u ** 3) * total_steps).long().clamp(max=total_steps - 1)


def train_sketch_adapter(components: dict, scenes: int = 4000, steps: int = 1500, batch_size: int = 32,
                         lr: float = 1e-3, caption_dropout: float = 0.1, seed: int = 0,
                         seconds: float | None = None, progress: bool = True) -> tuple[T2IAdapter, dict]:
    """Train a sketch adapter against the frozen toy base model on rendered base-world scenes.

    The loss is the base model's epsilon objective with the adapter's features added to the UNet's down blocks, at
    `cubic_timesteps`.

    Args:
        components: The toy base model's components (`vae`, `tokenizer`, `text_encoder`, `unet`, `scheduler`);
            left unchanged.
        scenes: How many random base-world scenes to render.
        steps: Optimiser steps.
        batch_size: Scenes per step.
        lr: AdamW learning rate.
        caption_dropout: Share of captions replaced by the empty one (the adapter then also steers the unguided
            branch of classifier-free guidance).
        seed: Seeds the scenes, the initialisation and the noise.
        seconds: Stop early after this many seconds (None: run every step).
        progress: Show progress bars.

    Returns:
        The trained adapter (eval mode) and a report (steps run, seconds, first and last mean losses).
    """
    torch.manual_seed(seed)
    vae, tokenizer, text_encoder, unet = (components[k] for k in ("vae", "tokenizer", "text_encoder", "unet"))
    size = unet.config.sample_size * vae_factor(vae)
    rng = np.random.default_rng([seed, 17])
    rendered = [random_scene(rng) for _ in range(scenes)]
    images, sketches, captions = [], [], []
    for scene in tqdm(rendered, desc="sketch adapter: rendering", disable=not progress):
        images.append(np.asarray(render(scene, size)))
        sketches.append(sketch(scene, size))
        captions.append(caption(scene))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    conditions = torch.from_numpy(np.stack(sketches))[:, None]
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(256)])
        latents = latents * vae.config.scaling_factor
        ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        states = torch.cat([text_encoder(chunk)[0] for chunk in ids.split(256)])
    empty = states[-1]
    states = states[:-1]

    held_out = min(256, scenes // 5)  # the last scenes: never trained on
    adapter = new_sketch_adapter(unet, vae)
    adapter.train()
    unet.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    total_steps = noise_scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    losses, started, done = [], time.perf_counter(), 0
    for step in tqdm(range(steps), desc="sketch adapter: training", disable=not progress):
        if seconds is not None and time.perf_counter() - started > seconds:
            break
        index = torch.randint(len(latents) - held_out, (batch_size,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        timesteps = cubic_timesteps(batch_size, total_steps, generator)
        noisy = noise_scheduler.add_noise(latents[index], noise, timesteps)
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        text = torch.where(drop[:, None, None], empty[None], states[index])
        features = adapter(conditions[index])
        prediction = unet(noisy, timesteps, text, down_intrablock_additional_residuals=list(features)).sample
        loss = (prediction - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # cosine decay to a tenth
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
    adapter.eval()
    window = max(1, min(50, len(losses) // 4))
    report = {"scenes": scenes - held_out, "held_out": held_out, "steps": done, "batch_size": batch_size, "lr": lr,
              "seconds": round(time.perf_counter() - started, 1),
              "loss_first": float(np.mean(losses[:window])) if losses else float("nan"),
              "loss_last": float(np.mean(losses[-window:])) if losses else float("nan"),
              **held_out_losses(adapter, unet, noise_scheduler, latents[-held_out:], states[-held_out:],
                                conditions[-held_out:], seed)}
    logger.info("sketch adapter: %d steps in %.0f s, held-out loss %.4f without it, %.4f with it", done,
                report["seconds"], report["held_out_loss_without"], report["held_out_loss_with"])
    return adapter, report


def held_out_losses(adapter: T2IAdapter, unet, noise_scheduler, latents: torch.Tensor, states: torch.Tensor,
                    conditions: torch.Tensor, seed: int) -> dict[str, float]:
    """The base model's epsilon loss on held-out scenes (same noise and timesteps) without and with the
    adapter's features: what the sketch tells the model that the caption does not."""
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = cubic_timesteps(len(latents), noise_scheduler.config.num_train_timesteps, generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        without = unet(noisy, timesteps, states).sample
        features = adapter(conditions)
        with_adapter = unet(noisy, timesteps, states, down_intrablock_additional_residuals=list(features)).sample
    return {"held_out_loss_without": float((without - noise).pow(2).mean()),
            "held_out_loss_with": float((with_adapter - noise).pow(2).mean())}


def save_sketch_adapter(adapter: T2IAdapter, folder: str | Path, report: dict) -> Path:
    """Write `folder/sketch_adapter/` (diffusers format, fp16 weights, `training_report.json`), replacing an earlier
    one only once the new one is complete."""
    target = Path(folder) / SKETCH_ADAPTER_FOLDER
    with tempfile.TemporaryDirectory(dir=Path(folder)) as scratch:
        staged = Path(scratch) / SKETCH_ADAPTER_FOLDER
        adapter.save_pretrained(staged)
        for path in staged.glob("*.safetensors"):
            tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
        (staged / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
        for path in staged.iterdir():
            path.chmod(0o644)  # readable like the rest of the package data
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


def main(argv: list[str] | None = None) -> Path:
    """`python scripts/train_toy_sketch_adapter.py [--base DIR] [--steps N]`: train and save a toy sketch adapter."""
    parser = argparse.ArgumentParser(description="Train the toy world's sketch T2I-Adapter against its base model.")
    parser.add_argument("--base", default=None, help="toy-world folder (default: the bundled one); the adapter is "
                                                     "written into it, as sketch_adapter/")
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    parser.add_argument("--scenes", type=int, default=4000, help="rendered base-world scenes")
    parser.add_argument("--batch-size", type=int, default=32, help="scenes per step")
    parser.add_argument("--seed", type=int, default=0, help="seeds scenes, initialisation and noise")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = Path(args.base) if args.base else toyworld_asset_folder()
    if not (folder / "model_index.json").is_file():
        raise SystemExit(f"{folder}: no toy-world model here (no model_index.json); give a folder written by "
                         "scripts/train_toyworld.py")
    adapter, report = train_sketch_adapter(load_base_components(folder), scenes=args.scenes, steps=args.steps,
                                           batch_size=args.batch_size, seed=args.seed)
    report["torch_threads"] = torch.get_num_threads()
    path = save_sketch_adapter(adapter, folder, report)
    logger.info("wrote %s", path)
    return path
