"""Random SD-shaped components built in code (no download): tiny ones for tests, SD1.5-sized ones for benchmarks."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL, ControlNetModel, T2IAdapter, UNet2DConditionModel

from .models import clip_text_encoder, stable_diffusion_scheduler
from .tokenizer import load_clip_tokenizer


def tiny_components(seed: int = 0) -> dict:
    """A tiny Stable-Diffusion-shaped model: cross-attention at two resolutions (7 layers), 32x32 images.

    Args:
        seed: seeds the random weights, so the same seed gives the same "base model".

    Returns:
        A dict with `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler` (diffusers/transformers objects).
    """
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, layers=2, heads=4, intermediate=37, projection=32)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": stable_diffusion_scheduler()}


def sd15_components(seed: int = 0) -> dict:
    """Random weights in the shapes of Stable Diffusion 1.5 (UNet 860M, CLIP ViT-L/14 text encoder, SD VAE).

    Args:
        seed: seeds the random weights.

    Returns:
        The same dict as `tiny_components`, SD1.5-sized.
    """
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer()
    text_encoder = clip_text_encoder(tokenizer, hidden_size=768, layers=12, heads=12, intermediate=3072,
                                     projection=768)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": stable_diffusion_scheduler()}


def random_t2i_adapter(components: dict, seed: int = 0, in_channels: int = 3) -> T2IAdapter:
    """A random T2I-Adapter whose features fit `components`' UNet (one feature map per down block)."""
    torch.manual_seed(seed)
    unet, vae = components["unet"], components["vae"]
    adapter = T2IAdapter(in_channels=in_channels, channels=list(unet.config.block_out_channels),
                         num_res_blocks=1, downscale_factor=2 ** (len(vae.config.block_out_channels) - 1),
                         adapter_type="full_adapter")
    with torch.no_grad():  # diffusers starts some layers at zero; make every feature matter
        for parameter in adapter.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return adapter


def random_controlnet(components: dict, seed: int = 0) -> ControlNetModel:
    """A random ControlNet for `components`' UNet (its zero convolutions made nonzero so it changes the output)."""
    torch.manual_seed(seed)
    factor_steps = len(components["vae"].config.block_out_channels) - 1  # condition image -> latent: 2**steps
    channels = tuple(8 * 2 ** i for i in range(factor_steps + 1))
    controlnet = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=channels)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return controlnet


def save_tiny_base(path, seed: int = 0):
    """Write `tiny_components(seed)` as a diffusers pipeline folder (what `--base DIR` takes); returns the path."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def random_concept(components: dict, words: tuple[str, ...], seed: int = 0, rank: int = 4, lora_std: float = 0.05,
                   embedding_std: float = 0.3, unet_layers: str = r".*", text_encoder_lora_std: float | None = None,
                   unet_lora_layers: str = "attention"):
    r"""A random ED-LoRA concept for `components`: layer-wise embeddings and nonzero LoRA on every default target.

    Args:
        components: the base components it is made for (its fingerprint is recorded).
        words: the concept words.
        seed: seeds the random values.
        rank: LoRA rank.
        lora_std: standard deviation of the LoRA A and B entries.
        embedding_std: standard deviation of the embedding entries.
        unet_layers: regex; only UNet layers whose path matches get LoRA (e.g. r".*attn2\.to_[kv]").
        text_encoder_lora_std: the text encoder's LoRA entries' standard deviation (default: `lora_std`); ED-LoRA
            trains it with a 10x smaller learning rate than the UNet's.
        unet_lora_layers: the UNet's targets, a key of `lora.UNET_TARGET_PATTERNS` (`TrainConfig.unet_lora_layers`).

    Returns:
        A `ConceptFile`.
    """
    from .attention import cross_attention_layers
    from .concept_file import ConceptFile, fingerprint
    from .lora import base_weight, target_paths

    generator = torch.Generator().manual_seed(seed)
    unet, text_encoder = components["unet"], components["text_encoder"]
    layers, hidden = len(cross_attention_layers(unet)), text_encoder.config.hidden_size

    def lora(model, part):
        std = text_encoder_lora_std if part == "text_encoder" and text_encoder_lora_std is not None else lora_std
        weights = {}
        for path in target_paths(model, part, unet_lora_layers):
            if part == "unet" and not re.fullmatch(unet_layers, path):
                continue
            out_features, in_features = base_weight(model, path).shape
            weights[path] = (torch.randn(rank, in_features, generator=generator) * std,
                             torch.randn(out_features, rank, generator=generator) * std)
        return weights

    return ConceptFile(
        words=tuple(words),
        embeddings={w: torch.randn(layers, hidden, generator=generator) * embedding_std for w in words},
        text_encoder_lora=lora(text_encoder, "text_encoder"),
        unet_lora=lora(unet, "unet"),
        rank=rank,
        alpha=float(rank),
        base=fingerprint(components["tokenizer"], text_encoder, unet),
        initializers=("<rand-0.013>",) * len(words),
    )
