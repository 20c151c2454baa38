"""The toy world's base-model architecture: small SD-shaped VAE, CLIP text encoder and UNet (untrained) with
Stable Diffusion's scheduler; plus loading the trained model shipped in `mixofshow/assets/toyworld/`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ..models import clip_text_encoder, stable_diffusion_scheduler
from ..tokenizer import load_clip_tokenizer

IMAGE_SIZE = 64
TEXT_HIDDEN = 64  # the token-embedding table is 49408 x TEXT_HIDDEN: 6.3 MB in fp16 at 64


def toy_vae() -> AutoencoderKL:
    """A VAE with downsampling factor 4: 64x64x3 images <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def toy_text_encoder(tokenizer) -> CLIPTextModel:
    """A 4-layer CLIP text transformer over the full CLIP vocabulary (ids compatible with the real tokenizer)."""
    return clip_text_encoder(tokenizer, hidden_size=TEXT_HIDDEN, layers=4, heads=4, intermediate=4 * TEXT_HIDDEN,
                             projection=TEXT_HIDDEN)


def toy_unet(cross_attention_dim: int = TEXT_HIDDEN, vae_factor: int = 4) -> UNet2DConditionModel:
    """A UNet on 16x16 latents: cross-attention at 16x16 and 8x8 (down and up) and in the 4x4 mid block."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // vae_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def vae_factor(vae: AutoencoderKL) -> int:
    """How many image pixels one latent pixel spans along a side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def toy_components(seed: int = 0) -> dict:
    """The untrained toy base model.

    Args:
        seed: seeds the random weights.

    Returns:
        A dict with `unet`, `vae`, `text_encoder`, `tokenizer` (the shipped CLIP tokenizer), `scheduler`.
    """
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = toy_text_encoder(tokenizer)
    vae = toy_vae()
    unet = toy_unet(text_encoder.config.hidden_size, 2 ** (len(vae.config.block_out_channels) - 1))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": stable_diffusion_scheduler()}


def toy_pipeline(components: dict) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` of toy components, without safety checker."""
    return StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def toyworld_asset_folder() -> Path:
    """The shipped toy-world folder: the trained base model (a diffusers folder) and `classifier.safetensors`."""
    folder = resources.files("mixofshow") / "assets" / "toyworld"
    return Path(str(folder))


def load_toyworld_pipeline(folder: str | Path | None = None, dtype: torch.dtype = torch.float32
                           ) -> StableDiffusionPipeline:
    """Load the trained toy base model offline (default: the one shipped with the package).

    Args:
        folder: A folder written by `scripts/train_toyworld.py`; None for the shipped one.
        dtype: The weights' dtype (they are stored in fp16).
    """
    folder = Path(folder) if folder is not None else toyworld_asset_folder()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder}: no toy-world model here (no model_index.json); train one with "
            f"`python scripts/train_toyworld.py --out {folder}`."
        )
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
