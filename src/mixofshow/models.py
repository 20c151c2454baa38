"""Loading a base model (a diffusers folder, a single .safetensors/.ckpt checkpoint, or a Hub id), and the pieces
of models built in code: Stable Diffusion's noise schedule, a random CLIP text encoder."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from .errors import MixOfShowError

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def stable_diffusion_scheduler() -> DDIMScheduler:
    """Stable Diffusion's noise schedule (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def clip_text_encoder(tokenizer, hidden_size: int, layers: int, heads: int, intermediate: int,
                      projection: int) -> CLIPTextModel:
    """A randomly initialised CLIP text transformer for `tokenizer` (its vocabulary, length and special ids)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu"))


def load_base_components(base: str | Path, dtype: torch.dtype = torch.float32) -> dict:
    """Load the components of a Stable-Diffusion-style base model.

    Args:
        base: a diffusers pipeline folder, a single checkpoint file, or a Hugging Face Hub id.
        dtype: the weights' dtype.

    Returns:
        A dict with `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`.
    """
    path = Path(base)
    kwargs = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise MixOfShowError(f"base model folder {path} has no model_index.json: give a diffusers pipeline folder")
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **kwargs)
    elif path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise MixOfShowError(f"base model file {path} is not a {' or '.join(SINGLE_FILE_SUFFIXES)} checkpoint")
        try:
            pipe = StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        except OSError as error:
            raise MixOfShowError(
                f"could not load single-file checkpoint {path}: {error}. Converting a single file needs the model's "
                "config from the Hub; without network, convert it once where there is network, or use a folder"
            ) from None
    elif str(base).startswith((".", "/", "~")) or path.suffix in SINGLE_FILE_SUFFIXES:
        raise MixOfShowError(f"base model {base} does not exist")
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(base), **kwargs)
        except (OSError, ValueError) as error:
            raise MixOfShowError(
                f"could not load base model {base!r} from the Hugging Face Hub ({type(error).__name__}): check the id "
                "and the network, or pass a local diffusers folder or checkpoint file"
            ) from None
    return {name: getattr(pipe, name) for name in COMPONENTS}
