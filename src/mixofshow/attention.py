"""Attention processors: layer-wise (P+) text conditioning, region-aware cross-attention, attention map capture, and
the UNet's layer order."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

# `cross_attention_kwargs` keys: the per-layer prompt encodings (L, B, T, D), and an `AttentionMapRecorder`.
# Both travel with the call (not as processor state), so gradient checkpointing recomputes the same path.
LAYERWISE_KEY = "layerwise_encoder_hidden_states"
RECORDER_KEY = "attention_recorder"
REGIONS_KEY = "regional_attention"


def cross_attention_layers(unet) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention layers in Mix-of-Show order (down blocks, mid block, up blocks).

    Layer k of this list reads the k-th layer-wise prompt encoding; its length is the number of layer-wise
    embeddings a concept word gets (16 for SD1.x, 70 for SDXL).

    Args:
        unet: a diffusers `UNet2DConditionModel`.

    Returns:
        `(module path, Attention module)` pairs, paths as in `unet.named_modules()`.
    """
    layers = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        block = getattr(unet, part, None)
        if block is None:
            continue
        for name, module in block.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                layers.append((f"{part}.{name}", module))
    return layers


class AttentionMapRecorder:
    """Collects head-averaged cross-attention probabilities of chosen token positions, one entry per layer call.

    Pass it to the UNet as `cross_attention_kwargs={RECORDER_KEY: recorder}`.
    """

    def __init__(self, token_positions: torch.Tensor):
        self.token_positions = token_positions  # (B, K) token index per sample and tracked token
        self.maps: list[torch.Tensor] = []  # each (B, HW, K)

    def record(self, probs: torch.Tensor, batch_size: int) -> None:
        probs = probs.view(batch_size, -1, *probs.shape[-2:]).mean(dim=1)  # (B, HW, T)
        index = self.token_positions.to(probs.device)[:, None, :].expand(-1, probs.shape[1], -1)
        self.maps.append(probs.gather(2, index))


class RegionalAttention:
    """Region prompts for region-aware cross-attention (Mix-of-Show regional sampling).

    In every cross-attention layer the global output h is computed as usual; each region i's output h_i is the same
    layer's attention from the same queries to region i's prompt encoding, and inside region i's mask h is replaced
    by h_i (averaged where masks overlap; a soft mask blends). Attention is per query, so this equals attending from
    the region's cropped features alone, which is what the processor does: each prompt is attended from the
    positions where it has weight only (`slots`), all prompts in one call, so R regions that tile the image cost
    about one plain attention. Pass it as `cross_attention_kwargs={REGIONS_KEY: regional}`.

    Args:
        states: `(R, L, B, T, D)` region prompt encodings, batched like the global ones (negatives first under
            guidance, so the unconditional branch reads each region's negative prompt); L is 1 when no region uses a
            layer-wise word.
        masks: `(R, h, w)` region masks in [0, 1] at the latent resolution.
        trainable: Gradients flow through the region prompts' keys and values (training with regional prompts);
            by default they are projected once, without gradients, and reused at every sampling step.
        isolate: Keep the regions apart in self-attention too (`self_attention_mask`), against features of one
            region's subject bleeding into a neighbour's. Not part of the official method, which only separates the
            regions' cross-attention.
    """

    def __init__(self, states: torch.Tensor, masks: torch.Tensor, trainable: bool = False, isolate: bool = False):
        if states.shape[0] != masks.shape[0]:
            raise ValueError(f"{states.shape[0]} region encodings but {masks.shape[0]} masks")
        self.states = states
        self.masks = masks
        self.trainable = trainable
        self.isolate = isolate
        self._masks: dict[tuple, torch.Tensor] = {}
        self._isolation: dict[tuple, torch.Tensor] = {}
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}
        self._projected: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def layer_states(self, layer_index: int) -> torch.Tensor:
        """`(R, B, T, D)`: every region's prompt encoding for cross-attention layer `layer_index`."""
        return self.states[:, layer_index if self.states.shape[1] > 1 else 0]

    def keys_and_values(self, layer_index: int, attn: Attention, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(R * B, T, C)` keys and values of every region's prompt in cross-attention layer `layer_index` (`attn`),
        region-major. The prompts do not change while sampling, so they are projected once per layer, not per step
        (unless `trainable`: then every call projects them, with gradients)."""
        key = (layer_index, dtype)
        if self.trainable or key not in self._projected:
            with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
                states = self.layer_states(layer_index).flatten(0, 1).to(dtype)
                if attn.norm_cross:
                    states = attn.norm_encoder_hidden_states(states)
                projected = (attn.to_k(states), attn.to_v(states))
            if self.trainable:
                return projected
            self._projected[key] = projected
        return self._projected[key]

    def blend(self, outputs: torch.Tensor) -> torch.Tensor:
        """`(B, N, C)` layer output from `(1 + R, B, N, C)` attention outputs: the global one, then each region's."""
        weights, cover = self.weights(outputs.shape[2], outputs)  # (R, 1, N, 1), (1, N, 1)
        return outputs[0] * (1 - cover) + (weights * outputs[1:]).sum(0)

    def masks_at(self, tokens: int, device: torch.device) -> torch.Tensor:
        """`(R, tokens)` float32 region masks at a layer whose feature map has `tokens` positions: the latent-size
        masks area-downsampled by two until they have that many (made once per resolution)."""
        key = (tokens, device)
        if key not in self._masks:
            masks = self.masks[:, None].to(device, torch.float32)
            while masks.shape[-2] * masks.shape[-1] > tokens:  # UNet downsampling rounds odd sizes up
                masks = F.interpolate(masks, size=(-(-masks.shape[-2] // 2), -(-masks.shape[-1] // 2)), mode="area")
            if masks.shape[-2] * masks.shape[-1] != tokens:
                raise ValueError(f"no downsampling of the {tuple(self.masks.shape[1:])} region masks has {tokens} "
                                 "positions")
            self._masks[key] = masks.flatten(1)
        return self._masks[key]

    def self_attention_mask(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """`(tokens, tokens)` additive self-attention mask that keeps the regions apart: a query inside some region
        does not see keys inside regions it is not in (`-inf`); it sees its own regions and everything outside the
        regions, and queries outside every region see everything (0). A position is inside a region where the
        region's mask, at this resolution, is above one half. Made once per resolution."""
        key = (tokens, like.device, like.dtype)
        if key not in self._isolation:
            member = (self.masks_at(tokens, like.device) > 0.5).float()  # (R, tokens)
            outside = member.sum(0) == 0
            allowed = (member.T @ member > 0) | outside[:, None] | outside[None, :]
            mask = torch.zeros(tokens, tokens, device=like.device, dtype=like.dtype)
            self._isolation[key] = mask.masked_fill(~allowed, float("-inf"))
        return self._isolation[key]

    def weights(self, tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(R, 1, tokens, 1)` per-region weights (the masks, divided by their sum where it exceeds 1) and the
        `(1, tokens, 1)` coverage (their sum, at most 1: the global prompt keeps the rest)
        for a layer whose feature map has `tokens` positions (the latent map downsampled by a power of two), on
        `like`'s device and in its dtype (made once per resolution: no copy per layer call)."""
        key = (tokens, like.device, like.dtype)
        if key not in self._weights:
            masks = self.masks_at(tokens, like.device)[..., None]  # (R, tokens, 1)
            cover = masks.sum(0, keepdim=True)
            weights = (masks / cover.clamp_min(1.0))[:, None]  # sums to the coverage, at most 1
            self._weights[key] = (weights.to(like.dtype), cover.clamp_max(1.0).to(like.dtype))
        return self._weights[key]

    def slots(self, tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Where each prompt's attention is needed at a layer with `tokens` positions: `(G,)` prompt indices (0 the
        global prompt, i region i; prompts with no position left out), `(G, M)` the positions each one covers
        (padded with position 0) and `(G, 1, M, 1)` their blend weights (0 on padding). None when attending from
        every position to every prompt costs no more (large overlapping or soft masks). Made once per resolution."""
        key = (tokens, like.device, like.dtype)
        if key not in self._slots:
            weights, cover = self.weights(tokens, like)
            per_prompt = torch.cat([1 - cover, weights[:, 0]])[..., 0]  # (1 + R, tokens)
            present = per_prompt > 0
            counts = present.sum(1).tolist()
            prompts = [i for i, count in enumerate(counts) if count]
            width = max(counts)
            if len(prompts) * width >= len(counts) * tokens:
                self._slots[key] = None
            else:
                index = torch.zeros(len(prompts), width, dtype=torch.long, device=like.device)
                slot_weights = torch.zeros(len(prompts), width, dtype=like.dtype, device=like.device)
                for row, prompt in enumerate(prompts):
                    positions = present[prompt].nonzero()[:, 0]
                    index[row, : len(positions)] = positions
                    slot_weights[row, : len(positions)] = per_prompt[prompt, positions]
                prompt_index = torch.tensor(prompts, device=like.device)
                self._slots[key] = (prompt_index, index, slot_weights[:, None, :, None])
        return self._slots[key]


class MixOfShowAttnProcessor:
    """Scaled-dot-product attention that lets each cross-attention layer read its own prompt encoding.

    Set on every attention module of the UNet. For cross-attention layers (`layer_index` set) the encoder states
    come from `layerwise_encoder_hidden_states[layer_index]` when the caller passes them through
    `cross_attention_kwargs`; a first dimension of 1 is shared by all layers. Without them it is the stock
    `AttnProcessor2_0` computation.
    """

    batch_regions = True  # regions in the global attention call (False: one extra call for all regions)

    def __init__(self, layer_index: int | None = None, explicit_softmax: bool = False):
        self.layer_index = layer_index
        self.explicit_softmax = explicit_softmax  # the classic materialised-softmax path (benchmark reference)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        layerwise_encoder_hidden_states: torch.Tensor | None = None,
        attention_recorder: AttentionMapRecorder | None = None,
        regional_attention: RegionalAttention | None = None,
    ) -> torch.Tensor:
        if self.layer_index is not None and layerwise_encoder_hidden_states is not None:
            layers = layerwise_encoder_hidden_states
            encoder_hidden_states = layers[self.layer_index if layers.shape[0] > 1 else 0]

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if (regional_attention is not None and regional_attention.isolate and encoder_hidden_states is None
                and attention_mask is None):
            attention_mask = regional_attention.self_attention_mask(hidden_states.shape[1], hidden_states)
        recording = attention_recorder is not None and self.layer_index is not None
        regional = regional_attention if self.layer_index is not None else None
        # Regions ride in the global attention call: [global; region 1; ...; region R] prompts as one batch.
        batched = regional is not None and self.batch_regions and not (recording or self.explicit_softmax
                                                                        or attention_mask is not None)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if batched:
            region_key, region_value = regional.keys_and_values(self.layer_index, attn, key.dtype)
            key, value = torch.cat([key, region_key]), torch.cat([value, region_value])

        head_dim = key.shape[-1] // attn.heads
        groups = key.shape[0] // batch_size  # 1, or 1 + R with batched regions
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key, value = (x.view(groups * batch_size, -1, attn.heads, head_dim).transpose(1, 2) for x in (key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        slots = regional.slots(query.shape[2], query) if batched else None
        if slots is not None:  # each prompt attended from its own positions only
            hidden_states = self.attend_from_slots(query, key, value, slots)
        else:
            if groups > 1:
                query = query.unsqueeze(0).expand(groups, -1, -1, -1, -1).flatten(0, 1)
            if recording or self.explicit_softmax:
                # Explicit softmax so the probabilities can be kept; cheap for cross-attention (T = 77 keys).
                scores = query @ key.transpose(-1, -2) * attn.scale
                if attention_mask is not None:
                    scores = scores + attention_mask
                probs = scores.softmax(dim=-1)
                if recording:
                    attention_recorder.record(probs, batch_size)
                hidden_states = probs.to(value.dtype) @ value
            else:
                hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
            hidden_states = hidden_states.transpose(1, 2).reshape(groups * batch_size, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            if batched:
                hidden_states = regional.blend(hidden_states.view(groups, batch_size, *hidden_states.shape[1:]))
            elif regional is not None:
                hidden_states = self.apply_regions(attn, query, hidden_states, regional)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


    @staticmethod
    def attend_from_slots(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Blended `(B, N, C)` output of one attention call in which each prompt is attended only from the positions
        `RegionalAttention.slots` gives it.

        `query` is `(B, heads, N, d)`; `key`/`value` are `(G_all * B, heads, T, d)`, the global prompt then each
        region's."""
        batch, heads, tokens, head_dim = query.shape
        prompts, index, slot_weights = slots
        groups, width = index.shape
        key, value = (x.unflatten(0, (-1, batch))[prompts].flatten(0, 1) for x in (key, value))
        query = query[:, :, index.flatten()].unflatten(2, (groups, width)).permute(2, 0, 1, 3, 4).flatten(0, 1)
        out = F.scaled_dot_product_attention(query, key, value)  # (G * B, heads, M, d)
        out = out.transpose(1, 2).reshape(groups, batch, width, heads * head_dim).to(query.dtype) * slot_weights
        hidden_states = out.new_zeros(batch, tokens, heads * head_dim)
        for group in range(groups):  # positions are distinct within a group (padding adds exact zeros)
            hidden_states.index_add_(1, index[group], out[group])
        return hidden_states

    def apply_regions(self, attn: Attention, query: torch.Tensor, hidden_states: torch.Tensor,
                      regional: RegionalAttention) -> torch.Tensor:
        """Replace the global attention output inside each region by the attention to the region's prompt.

        `query` is `(B, heads, N, d)`, `hidden_states` the global output `(B, N, C)` before the output projection
        (which is affine, so blending before it is blending after it)."""
        batch, heads, tokens, head_dim = query.shape
        states = regional.layer_states(self.layer_index)  # (R, B, T, D)
        regions = states.shape[0]
        states = states.reshape(regions * batch, *states.shape[2:]).to(query.dtype)
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        key, value = (x.view(regions * batch, -1, heads, head_dim).transpose(1, 2)
                      for x in (attn.to_k(states), attn.to_v(states)))
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = query.unsqueeze(0).expand(regions, -1, -1, -1, -1).reshape(regions * batch, heads, tokens, head_dim)
        if self.explicit_softmax:
            region_states = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1) @ value
        else:
            region_states = F.scaled_dot_product_attention(query, key, value)
        region_states = region_states.transpose(1, 2).reshape(regions, batch, tokens, heads * head_dim)
        return regional.blend(torch.cat([hidden_states[None], region_states]))


def install_processors(unet, explicit_softmax: bool = False) -> int:
    """Put a `MixOfShowAttnProcessor` on every attention module of the UNet.

    Args:
        unet: a diffusers `UNet2DConditionModel`.
        explicit_softmax: materialise every attention matrix instead of using SDPA (a reference, slower).

    Returns:
        The number of cross-attention layers (the layer-wise embedding count).
    """
    layer_index = {name: index for index, (name, _) in enumerate(cross_attention_layers(unet))}
    processors = {}
    for key in unet.attn_processors:
        module_path = key.removesuffix(".processor")
        processors[key] = MixOfShowAttnProcessor(layer_index.get(module_path), explicit_softmax)
    unet.set_attn_processor(processors)
    return len(layer_index)
