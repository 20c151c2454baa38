"""Region detail pass: each region of a finished image redrawn, zoomed in, with its own prompt alone.

Identity bleed between neighbouring subjects is the top complaint about regional prompting: a small subject next to
others loses the details that make it who it is. A detail pass finishes each region without its neighbours in view:
it crops a square window around the region, scales it to the model's own size, noises it back to `strength` and
denoises it with the region's detail prompt alone (SDEdit), scales it back and pastes it inside the region. The
community's face "detailers" do this for faces; here it is any region, with concept words.

    images = pipe(prompt, regions=regions).images
    images = detail_regions(pipe, images, [RegionDetail((0.6, 0.2, 1.0, 0.8), "a <hina1> <hina2>, close-up")])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..errors import MixOfShowError
from ..layout import check_detail_window

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the image's width and height


@dataclass(frozen=True)
class RegionDetail:
    """One region's detail pass.

    Args:
        box: Where the redrawn pixels go (x0, y0, x1, y1, fractions of the width and height): the region; only its
            part inside the window is redrawn.
        prompt: What the zoomed-in window shows (concept words allowed): the subject as seen close up.
        negative_prompt: Its negative prompt.
        window: The square crop that is redrawn, as a fraction box (default: the smallest square holding `box`,
            moved inside the image). It must be square in pixels and overlap `box`.
    """

    box: Box
    prompt: str
    negative_prompt: str = ""
    window: Box | None = None


def layout_details(layout) -> list[RegionDetail]:
    """The detail passes of a `Layout`'s regions that have a `detail_prompt`, in region order: each pasted inside
    its region's box (a mask region: the mask's bounding box), with the region's negative prompt."""
    def fraction(box):
        return box[0] / layout.width, box[1] / layout.height, box[2] / layout.width, box[3] / layout.height

    details = []
    for region, negative in zip(layout.regions, layout.region_negative_prompts()):
        if region.detail_prompt is None:
            continue
        window = None if region.detail_window is None else fraction(region.detail_window)
        details.append(RegionDetail(fraction(region.bounds(layout.width, layout.height)), region.detail_prompt,
                                    negative, window))
    return details


def square_window(box: Box, width: int, height: int) -> tuple[int, int, int]:
    """The smallest pixel square holding `box`, moved inside the image: (left, top, side)."""
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side = min(max(math.ceil(x1 - x0), math.ceil(y1 - y0)), width, height)
    left = min(max(round((x0 + x1 - side) / 2), 0), width - side)
    top = min(max(round((y0 + y1 - side) / 2), 0), height - side)
    return left, top, side


def _pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    return round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)


def _check_box(box, where: str) -> None:
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise MixOfShowError(f"{where} must be four numbers x0, y0, x1, y1, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise MixOfShowError(f"{where} {box!r} must have 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the "
                             "image)")


def detail_windows(details: Sequence[RegionDetail], width: int, height: int) -> list[tuple[int, int, int]]:
    """Each detail's crop window in pixels, (left, top, side), after checking boxes and windows."""
    windows = []
    for index, detail in enumerate(details):
        where = f"details[{index}]"
        _check_box(detail.box, f"{where}.box")
        if detail.window is None:
            windows.append(square_window(detail.box, width, height))
            continue
        _check_box(detail.window, f"{where}.window")
        left, top, right, bottom = _pixels(detail.window, width, height)
        check_detail_window((left, top, right, bottom), _pixels(detail.box, width, height), f"{where}.window")
        side = min(right - left, bottom - top)
        windows.append((left, top, side))
    return windows


@torch.no_grad()
def detail_regions(pipe, images: Sequence[Image.Image], details: Sequence[RegionDetail], strength: float = 0.85,
                   num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
                   progress: bool = True) -> list[Image.Image]:
    """Redraw each region of every image, one region after another (`RegionDetail`).

    Args:
        pipe: A `MixOfShowPipeline` (its concept words may appear in the detail prompts).
        images: Images of one size, e.g. a regional sampling's output.
        details: The regions to redraw, in order (a later region's pixels win where boxes overlap).
        strength: How much of each window is redrawn: the share of the denoising steps run again, in (0, 1].
        num_inference_steps: Steps of a full denoising; about `strength` of them run per region.
        guidance_scale: Classifier-free guidance.
        seed: Seeds the noise (region i uses `seed + i`, on the CPU, so a seed means the same pixels everywhere).
        progress: Show a progress bar over the regions.

    Returns:
        The images with every region redrawn.
    """
    if not images:
        return []
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise MixOfShowError("detail_regions: every image must have the same size")
    if not 0 < strength <= 1:
        raise MixOfShowError(f"detail strength must be in (0, 1], got {strength}")
    windows = detail_windows(details, width, height)
    for index, detail in enumerate(details):
        pipe.check_prompt_text(f"details[{index}].prompt", detail.prompt)
        pipe.check_prompt_text(f"details[{index}].negative_prompt", detail.negative_prompt)

    device, dtype = pipe._execution_device, pipe.vae.dtype
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = pipe.image_processor.preprocess(list(images)).to(device, dtype)  # (B, 3, H, W) in [-1, 1]
    batch = pixels.shape[0]
    for index, (detail, (left, top, side)) in enumerate(tqdm(list(zip(details, windows)), desc="detail pass",
                                                            unit="region", disable=not progress)):
        crop = pixels[:, :, top:top + side, left:left + side]
        zoomed = _resize(crop, size)
        redrawn = _redraw(pipe, zoomed, detail, strength, num_inference_steps, guidance_scale, seed + index)
        back = _resize(redrawn, side)
        x0, y0, x1, y1 = _pixels(detail.box, width, height)
        inside = torch.zeros(1, 1, side, side, device=device, dtype=dtype)
        inside[..., max(y0 - top, 0):min(y1 - top, side), max(x0 - left, 0):min(x1 - left, side)] = 1
        window = pixels[:, :, top:top + side, left:left + side]
        pixels[:, :, top:top + side, left:left + side] = inside * back + (1 - inside) * window
        logger.debug("detail pass: region %d of %d images redrawn", index, batch)
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def _resize(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """`(B, 3, S, S)` pixels in [-1, 1] scaled to `side`: bicubic when growing, area-averaged when shrinking."""
    if pixels.shape[-1] == side:
        return pixels
    growing = side > pixels.shape[-1]
    out = F.interpolate(pixels.float(), size=(side, side), mode="bicubic" if growing else "area",
                        align_corners=False if growing else None)
    return out.clamp(-1, 1).to(pixels.dtype)


def _redraw(pipe, zoomed: torch.Tensor, detail: RegionDetail, strength: float, steps: int, guidance: float,
            seed: int) -> torch.Tensor:
    """SDEdit of `(B, 3, S, S)` pixels in [-1, 1] with the detail's prompt; the same shape back."""
    batch = zoomed.shape[0]
    latents = pipe.vae.encode(zoomed).latent_dist.mean * pipe.vae.config.scaling_factor
    pipe.scheduler.set_timesteps(steps, device=latents.device)
    timesteps = pipe.scheduler.timesteps[steps - max(1, round(steps * strength)):]
    noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    latents = pipe.scheduler.add_noise(latents, noise.to(latents), timesteps[:1].repeat(batch))
    guided = guidance > 1.0
    states = pipe.encode_layerwise_prompt([detail.prompt] * batch,
                                          [detail.negative_prompt] * batch if guided else None)
    states = states.to(latents.device, pipe.unet.dtype)
    for t in timesteps:
        latents = pipe.scheduler.step(pipe.predict_noise(latents, t, states, guidance), t, latents).prev_sample
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
