"""Regional sampling inputs: region prompts with masks, and spatial conditions (T2I-Adapter, ControlNet)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, T2IAdapter
from PIL import Image

from ..errors import MixOfShowError

logger = logging.getLogger(__name__)

CONDITION_MODELS = {"T2IAdapter": T2IAdapter, "ControlNetModel": ControlNetModel}


@dataclass
class RegionPrompts:
    """Region prompts of one image: each region's prompt, negative prompt, mask and T2I-Adapter/ControlNet weight.

    Pixels outside every mask keep the global prompt; where masks overlap the regions are averaged. `isolate` keeps
    the regions apart in self-attention as well (see `RegionalAttention`).
    """

    prompts: list[str]
    negative_prompts: list[str]
    masks: torch.Tensor  # (R, H, W) in [0, 1] at the image resolution
    adapter_weights: list[float] = field(default_factory=list)  # one per region; empty = 1.0 each
    isolate: bool = False

    def __post_init__(self):
        if not self.adapter_weights:
            self.adapter_weights = [1.0] * len(self.prompts)
        counts = {len(self.prompts), len(self.negative_prompts), self.masks.shape[0], len(self.adapter_weights)}
        if len(counts) != 1:
            raise MixOfShowError(f"regions: {len(self.prompts)} prompts, {len(self.negative_prompts)} negative "
                                 f"prompts, {self.masks.shape[0]} masks and {len(self.adapter_weights)} adapter "
                                 "weights: give one of each per region")

    @classmethod
    def from_layout(cls, layout) -> RegionPrompts | None:
        """The regions of a `Layout` (None when it has none)."""
        if not layout.regions:
            return None
        return cls([r.prompt for r in layout.regions], layout.region_negative_prompts(), layout.region_masks(),
                   [r.adapter_weight for r in layout.regions], isolate=layout.isolate_regions)

    def weight_map(self, weight: float) -> torch.Tensor:
        """`(1, 1, H, W)` spatial weight of a condition: `weight` outside the regions, times each region's adapter
        weight inside it (averaged where regions overlap)."""
        masks = self.masks.float()
        cover = masks.sum(0)
        inside = (masks * torch.tensor(self.adapter_weights, dtype=torch.float32)[:, None, None]).sum(0)
        inside = inside / cover.clamp_min(1e-8)
        blend = cover.clamp_max(1.0)
        return (weight * ((1 - blend) + blend * inside))[None, None]


@dataclass
class SpatialCondition:
    """A spatial condition: a T2I-Adapter or ControlNet, its condition image and its weight."""

    model: T2IAdapter | ControlNetModel
    image: torch.Tensor  # (1, C, H, W) in [0, 1], C = the model's input channels
    weight: float = 1.0
    name: str = "condition"  # how to name it in messages

    @property
    def is_controlnet(self) -> bool:
        return isinstance(self.model, ControlNetModel)


def load_condition_model(reference: str, dtype: torch.dtype = torch.float32) -> T2IAdapter | ControlNetModel:
    """A T2I-Adapter or ControlNet from a local folder or Hub id (which one: from its config's class name)."""
    try:
        config = T2IAdapter.load_config(reference)
    except (OSError, ValueError) as error:
        raise MixOfShowError(f"cannot read the condition model {reference!r} ({error}): give a local T2I-Adapter / "
                             "ControlNet folder or a Hub id") from None
    model_class = CONDITION_MODELS.get(config.get("_class_name"))
    if model_class is None:
        raise MixOfShowError(f"{reference!r} is a {config.get('_class_name')!r}, not a T2I-Adapter or ControlNet "
                             f"({', '.join(CONDITION_MODELS)})")
    return model_class.from_pretrained(reference, torch_dtype=dtype)


def condition_image(path: str, channels: int) -> torch.Tensor:
    """`(1, channels, H, W)` float image in [0, 1]: grayscale for 1-channel models (sketch), RGB otherwise."""
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as error:
        raise MixOfShowError(f"condition image {path} cannot be read ({error})") from None
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return (tensor[None] if channels == 1 else tensor.permute(2, 0, 1))[None]


def model_channels(model: T2IAdapter | ControlNetModel) -> int:
    """The number of image channels a condition model reads."""
    config = model.config
    return config.get("conditioning_channels") or config.get("in_channels", 3)


def load_spatial_conditions(layout, dtype: torch.dtype = torch.float32) -> list[SpatialCondition]:
    """The layout's conditions: each model loaded (a model used twice loads once) with its image."""
    models: dict[str, T2IAdapter | ControlNetModel] = {}
    conditions = []
    for index, condition in enumerate(layout.conditions):
        if condition.model not in models:
            models[condition.model] = load_condition_model(condition.model, dtype)
        model = models[condition.model]
        image = condition_image(condition.image, model_channels(model))
        conditions.append(SpatialCondition(model, image, condition.weight, f"conditions[{index}] ({condition.type})"))
    return conditions


def _scaled(residuals: Sequence[torch.Tensor], weight_map: torch.Tensor) -> list[torch.Tensor]:
    """Each residual times the weight map area-resized to its resolution."""
    return [r * F.interpolate(weight_map.to(r.device, torch.float32), size=r.shape[-2:], mode="area").to(r.dtype)
            for r in residuals]


class ConditionResiduals:
    """The UNet's extra inputs from spatial conditions, each scaled by its weight map: T2I-Adapter features (computed
    once) and ControlNet residuals (computed every step)."""

    def __init__(self, conditions: Sequence[SpatialCondition], regions: RegionPrompts | None, height: int,
                 width: int, batch: int, device, dtype: torch.dtype):
        self.adapter_features: list[torch.Tensor] | None = None
        self.controlnets: list[tuple[SpatialCondition, torch.Tensor, torch.Tensor]] = []
        for condition in conditions:
            weight_map = (regions.weight_map(condition.weight) if regions is not None
                          else torch.full((1, 1, height, width), float(condition.weight)))
            image = condition.image.to(device, dtype).expand(batch, -1, -1, -1)
            if condition.is_controlnet:
                self.controlnets.append((condition, image, weight_map))
                continue
            with torch.no_grad():
                features = _scaled(condition.model(image), weight_map)
            if self.adapter_features is None:
                self.adapter_features = features
            elif [f.shape for f in features] != [f.shape for f in self.adapter_features]:
                raise MixOfShowError(f"{condition.name}: its T2I-Adapter features do not match the other adapters'")
            else:
                self.adapter_features = [a + f for a, f in zip(self.adapter_features, features)]

    def unet_kwargs(self, model_input: torch.Tensor, t: torch.Tensor, states: torch.Tensor,
                    guided: bool) -> dict:
        """Keyword arguments of the UNet call for this step (`model_input` is already doubled under guidance)."""
        kwargs = {}
        if self.adapter_features is not None:
            features = self.adapter_features
            kwargs["down_intrablock_additional_residuals"] = [torch.cat([f, f]) if guided else f for f in features]
        down_total, mid_total = None, None
        for condition, image, weight_map in self.controlnets:
            image = torch.cat([image, image]) if guided else image
            down, mid = condition.model(model_input, t, encoder_hidden_states=states, controlnet_cond=image,
                                        return_dict=False)
            down, (mid,) = _scaled(down, weight_map), _scaled([mid], weight_map)
            down_total = down if down_total is None else [a + b for a, b in zip(down_total, down)]
            mid_total = mid if mid_total is None else mid_total + mid
        if down_total is not None:
            kwargs["down_block_additional_residuals"] = down_total
            kwargs["mid_block_additional_residual"] = mid_total
        return kwargs
