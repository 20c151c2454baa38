"""LoRA through PEFT on the attention (and optionally feed-forward) linears of the text encoder and the UNet: add,
read out, load, scale, delta."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from .errors import MixOfShowError

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# Which UNet linears get LoRA (TrainConfig.unet_lora_layers). "attention": the transformer blocks' self- (attn1) and
# cross-attention (attn2), as the official ED-LoRA. "cross_attention": only the cross-attention's key, value and
# output (Custom Diffusion tunes key and value only): they see the concept's own text features, not the image
# features every concept shares, so gradient fusion has less to reconcile. "attention_ff": "attention" plus the
# transformer blocks' feed-forward linears (as LoRA trainers commonly offer): attention alone re-routes what the base
# model can draw, the feed-forward layers change what each position's features become, for details the base model
# never drew.
UNET_TARGET_PATTERNS = {
    "attention": r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "cross_attention": r".*transformer_blocks\.\d+\.attn2\.(to_k|to_v|to_out\.0)",
    "attention_ff": r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))",
}
UNET_TARGET_PATTERN = UNET_TARGET_PATTERNS["attention"]  # the official targets, the default

LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))


def target_paths(model: torch.nn.Module, part: str, unet_lora_layers: str = "attention") -> list[str]:
    """Paths of the linear layers that LoRA targets in `part` ("text_encoder" or "unet"; in the UNet those of
    `UNET_TARGET_PATTERNS[unet_lora_layers]`, by default the official ones)."""
    wrapped = set(lora_layers(model))
    paths = []
    for path, module in model.named_modules():
        inside_wrapper = path.rpartition(".")[0] in wrapped or ".lora_" in path
        if path in wrapped or (isinstance(module, torch.nn.Linear) and not inside_wrapper):
            name = path.rsplit(".", 1)[-1]
            if (part == "unet" and re.fullmatch(UNET_TARGET_PATTERNS[unet_lora_layers], path)) or (
                    part == "text_encoder" and name in TEXT_ENCODER_TARGETS):
                paths.append(path)
    return paths


def base_weight(model: torch.nn.Module, path: str) -> torch.Tensor:
    """The weight (out, in) of the linear layer at `path`, under its LoRA wrapper if it has one."""
    module = model.get_submodule(path)
    return (module.get_base_layer() if isinstance(module, LoraLayer) else module).weight


def lora_config(targets: tuple[str, ...] | str, rank: int, alpha: float) -> LoraConfig:
    """A PEFT config; `alpha` follows PEFT (scaling = alpha / rank), so the official "alpha 1" is alpha = rank."""
    target_modules = list(targets) if isinstance(targets, tuple) else targets
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=True)


def add_lora(model: torch.nn.Module, targets: tuple[str, ...] | str, rank: int, alpha: float, name: str) -> None:
    """Add a fresh LoRA adapter (B = 0, so the model is unchanged) called `name` and make it trainable."""
    inject_adapter_in_model(lora_config(targets, rank, alpha), model, adapter_name=name)
    activate(model, [name])


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """PEFT LoRA layers by module path."""
    return {path: module for path, module in model.named_modules() if isinstance(module, LoraLayer)}


def lora_parameters(model: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The trainable A and B matrices of adapter `name`."""
    params = []
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return params


def read_lora(model: torch.nn.Module, name: str) -> LoraWeights:
    """Adapter `name` as `{module path: (A, B)}` copies in float32."""
    return {
        path: (layer.lora_A[name].weight.detach().float().cpu().clone(),
               layer.lora_B[name].weight.detach().float().cpu().clone())
        for path, layer in lora_layers(model).items()
        if name in layer.lora_A
    }


def align_module_paths(model: torch.nn.Module, weights: LoraWeights) -> LoraWeights:
    """Rename module paths between the two layouts of transformers' `CLIPTextModel`.

    transformers 4.x nests the text encoder's layers under `text_model.` (as official Mix-of-Show files do);
    transformers 5.x does not. A path the model lacks is mapped to the other layout when the model has that one.
    """
    modules = dict(model.named_modules())
    aligned = {}
    for path, pair in weights.items():
        if path not in modules:
            other = path.removeprefix("text_model.") if path.startswith("text_model.") else f"text_model.{path}"
            path = other if other in modules else path
        aligned[path] = pair
    return aligned


def check_lora_shapes(model: torch.nn.Module, weights: LoraWeights, part: str, source: str) -> None:
    """Raise, naming the first offending key, if `weights` do not fit the model's linear layers."""
    modules = dict(model.named_modules())
    for path, (down, up) in weights.items():
        module = modules.get(path)
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if not isinstance(base, torch.nn.Linear):
            raise MixOfShowError(
                f"{source}: {part} LoRA key {path!r} names no linear layer of this model: the file was made for "
                "another model architecture"
            )
        if down.shape[1] != base.in_features or up.shape[0] != base.out_features or down.shape[0] != up.shape[1]:
            raise MixOfShowError(
                f"{source}: {part} LoRA key {path!r} has shapes A {tuple(down.shape)}, B {tuple(up.shape)} but the "
                f"layer is {base.in_features} -> {base.out_features}: the file was made for another base model"
            )


def load_lora(model: torch.nn.Module, weights: LoraWeights, rank: int, alpha: float, name: str) -> None:
    """Add adapter `name` holding `weights` (already checked with `check_lora_shapes`)."""
    if not weights:
        return
    inject_adapter_in_model(lora_config(tuple(weights), rank, alpha), model, adapter_name=name)
    layers = lora_layers(model)
    with torch.no_grad():
        for path, (down, up) in weights.items():
            layer = layers[path]
            layer.lora_A[name].weight.copy_(down)
            layer.lora_B[name].weight.copy_(up)


def activate(model: torch.nn.Module, names: list[str]) -> None:
    """Make exactly these adapters active on every LoRA layer that has them."""
    for layer in lora_layers(model).values():
        layer.set_adapter([n for n in names if n in layer.lora_A])


def set_lora_scale(model: torch.nn.Module, name: str, scale: float) -> None:
    """Multiply adapter `name`'s trained scaling (alpha / rank) by `scale` (0 = base model)."""
    for layer in lora_layers(model).values():
        layer.set_scale(name, scale)


def lora_delta(down: torch.Tensor, up: torch.Tensor, rank: int, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """`dW = scale * alpha / rank * B @ A`, the change LoRA makes to a weight."""
    return (up.double() @ down.double() * (scale * alpha / rank)).float()
