"""ED-LoRA (and plain LoRA) single-concept tuning on accelerate: `train(config)` writes one concept file.

Every random draw of step s comes from a generator seeded with (seed, s, process), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .attention import (
    LAYERWISE_KEY,
    RECORDER_KEY,
    REGIONS_KEY,
    AttentionMapRecorder,
    RegionalAttention,
    install_processors,
)
from .concept_file import ConceptFile, fingerprint, read_safetensors, save_concept, write_atomically
from .config import TrainConfig
from .data import CONCEPT_PLACEHOLDER, ConceptDataset, scan_concept_folder
from .errors import MixOfShowError
from .lora import TEXT_ENCODER_TARGETS, UNET_TARGET_PATTERNS, add_lora, lora_parameters, read_lora
from .models import load_base_components
from .tokens import RANDOM_INIT, ConceptVocabulary, check_new_words, encode_layerwise, initial_embedding

logger = logging.getLogger(__name__)

ADAPTER = "concept"


class ConceptRowsEmbedding(torch.nn.Module):
    """A token embedding whose concept rows (ids >= `first_id`) are a separate trainable parameter.

    Replaces the text encoder's input embedding during training, so the base rows are never touched (no
    restore-after-step as the official trainer does) and the optimizer holds only the concept rows.
    """

    def __init__(self, base: torch.nn.Embedding, first_id: int):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.rows = torch.nn.Parameter(base.weight[first_id:].detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.base(input_ids)
        is_concept = input_ids >= self.first_id
        concept = self.rows[(input_ids - self.first_id).clamp(min=0)].to(embedded.dtype)
        return torch.where(is_concept[..., None], concept, embedded)


def step_generator(seed: int, step: int, process: int, micro: int = 0) -> torch.Generator:
    """The CPU generator for one micro-batch: a function of (seed, step, process, micro) only."""
    digest = hashlib.sha256(f"{seed}/{step}/{process}/{micro}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def batch_indices(seed: int, first_sample: int, count: int, dataset_size: int) -> list[int]:
    """Indices of samples `first_sample …` in an endless stream of seeded per-epoch permutations."""
    indices = []
    for sample in range(first_sample, first_sample + count):
        epoch, position = divmod(sample, dataset_size)
        order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        indices.append(int(order[position]))
    return indices


def subject_box(mask: torch.Tensor, size: tuple[int, int], margin: float = 0.25) -> torch.Tensor:
    """`(h, w)` float mask of the box around a `(H, W)` subject mask, widened by `margin` of its side on each side
    (at least one latent pixel), at the latent size `size`; the whole image when the mask is empty."""
    height, width = size
    small = F.interpolate(mask[None, None].float(), size=size, mode="area")[0, 0] > 0.25
    box = torch.zeros(size, device=mask.device)
    if not small.any():
        return box + 1
    rows, cols = small.any(1).nonzero()[:, 0], small.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dy, dx = max(1, round(margin * (y1 - y0))), max(1, round(margin * (x1 - x0)))
    box[max(0, y0 - dy):min(height, y1 + dy), max(0, x0 - dx):min(width, x1 + dx)] = 1
    return box


def masked_diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official ED-LoRA loss: squared error summed over channels, averaged over the (soft) subject mask."""
    mask = F.interpolate(mask, size=prediction.shape[-2:], mode="area")
    error = (prediction.float() - target.float()) ** 2 * mask
    return (error.sum(dim=(1, 2, 3)) / mask.sum(dim=(1, 2, 3)).clamp_min(1e-6)).mean()


def attention_regularization(maps: list[torch.Tensor], mask: torch.Tensor, latent_size: tuple[int, int],
                             class_like: list[bool], full_identity: bool, present: torch.Tensor) -> torch.Tensor:
    """Mix-of-Show attention regularisation on recorded cross-attention maps.

    Maps of one resolution are averaged over layers, normalised by their spatial maximum, and each tracked
    token's map is pushed out of the background (mean attention outside the mask); with `full_identity` a
    class-word token's map is instead pulled onto the mask (MSE). Summed over resolutions.

    Args:
        maps: `(B, HW, K)` maps, one per cross-attention layer call.
        mask: `(B, 1, H, W)` subject masks in pixels.
        latent_size: `(h, w)` of the latents, to recover each map's height and width.
        class_like: per tracked token, whether it is a class word (random-initialised words are not).
        full_identity: see above.
        present: `(B, K)` whether the token occurs in the sample's prompt.

    Returns:
        The scalar regularisation loss (before its weight).
    """
    by_size: dict[int, list[torch.Tensor]] = {}
    for layer_map in maps:
        by_size.setdefault(layer_map.shape[1], []).append(layer_map.float())
    total = mask.new_zeros(())
    h, w = latent_size
    for size, group in by_size.items():
        factor = math.sqrt(h * w / size)
        shape = (round(h / factor), round(w / factor))
        attention = torch.stack(group).mean(dim=0)  # (B, HW, K)
        attention = attention / attention.amax(dim=1, keepdim=True).clamp_min(1e-8)
        subject = F.interpolate(mask, size=shape, mode="nearest").flatten(1)[..., None]  # (B, HW, 1)
        background = 1.0 - subject
        has_background = (background.sum(dim=1) > 0) & present  # (B, K)
        outside = (attention * background).sum(dim=1) / background.sum(dim=1).clamp_min(1.0)  # (B, K)
        terms = outside
        if full_identity:
            identity = ((attention - subject) ** 2).mean(dim=1)
            use_identity = torch.tensor(class_like, device=attention.device)[None, :]
            terms = torch.where(use_identity, identity, outside)
        total = total + (terms * has_background).sum() / has_background.sum().clamp_min(1)
    return total


def _save_checkpoint(path: Path, step: int, rows: torch.Tensor, lora: list[torch.Tensor], optimizer,
                     lr_scheduler, config: TrainConfig) -> None:
    tensors = {"rows": rows.detach().cpu().contiguous()}
    tensors.update({f"lora.{i}": p.detach().cpu().contiguous() for i, p in enumerate(lora)})
    state = optimizer.state_dict()
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    meta = {"step": step, "param_groups": state["param_groups"], "lr_scheduler": lr_scheduler.state_dict(),
            "config": dataclasses.asdict(config)}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={"mixofshow.checkpoint": json.dumps(meta)}))


def _load_checkpoint(path: Path, rows: torch.Tensor, lora: list[torch.Tensor], optimizer, lr_scheduler) -> int:
    tensors, metadata = read_safetensors(path)
    try:
        meta = json.loads(metadata["mixofshow.checkpoint"])
    except (KeyError, ValueError):
        raise MixOfShowError(f"{path} is not a mixofshow training checkpoint") from None
    if tensors["rows"].shape != rows.shape or len([k for k in tensors if k.startswith("lora.")]) != len(lora):
        raise MixOfShowError(f"checkpoint {path} belongs to another concept or model: shapes differ")
    with torch.no_grad():
        rows.copy_(tensors["rows"])
        for i, p in enumerate(lora):
            p.copy_(tensors[f"lora.{i}"])
    state: dict = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(state)
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    return int(meta["step"])


def _find_resume(resume: str, checkpoint_dir: Path) -> Path:
    if resume == "latest":
        found = sorted(checkpoint_dir.glob("step_*.safetensors"))
        if not found:
            raise MixOfShowError(f"--resume latest: no checkpoint in {checkpoint_dir}")
        return found[-1]
    path = Path(resume)
    if not path.is_file():
        raise MixOfShowError(f"checkpoint {path} does not exist")
    return path


def checkpoint_dir_for(out: str | Path) -> Path:
    """Where the resumable checkpoints of a concept file go: `<out without suffix>.checkpoints/`."""
    out = Path(out)
    return out.with_name(out.stem + ".checkpoints")


class EDLoRATrainer:
    """One concept's tuning: set-up (models, tokens, LoRA, optimizer), steps, checkpoints, the concept file.

    Args:
        config: the training config (`load_train_config`).
        components: already-loaded base components (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`),
            instead of loading `config.base`; they are modified in place.
        resume: a checkpoint file, or "latest" for the newest in `<out>.checkpoints/`.
    """

    def __init__(self, config: TrainConfig, components: dict | None = None, resume: str | None = None):
        # 1. Check everything that can be checked before the models load
        self.config = config
        examples = scan_concept_folder(config.data, config.masks, require_placeholder=config.require_placeholder)
        self.checkpoint_dir = checkpoint_dir_for(config.out)
        resume_path = _find_resume(resume, self.checkpoint_dir) if resume else None

        # 2. Base model, concept tokens and their initial embeddings
        # Unused parameters are expected once the embeddings freeze mid-run.
        self.accelerator = accelerator = Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.components = components = components or load_base_components(config.base)
        tokenizer, text_encoder, unet, vae = (components[k] for k in ("tokenizer", "text_encoder", "unet", "vae"))
        self.base_fingerprint = fingerprint(tokenizer, text_encoder, unet)
        self.num_cross_layers = num_layers = install_processors(unet)
        self.rows_per_word = num_layers if config.mode == "edlora" else 1
        check_new_words(tokenizer, config.words, num_layers)
        generator = torch.Generator().manual_seed(config.seed)
        table = text_encoder.get_input_embeddings().weight
        initial = [initial_embedding(init, tokenizer, table, generator) for init in config.init]
        self.vocabulary = ConceptVocabulary(num_layers)
        for word, row in zip(config.words, initial):
            self.vocabulary.add(tokenizer, text_encoder, word, row[None].expand(self.rows_per_word, -1))
        first_id = self.vocabulary.tokens[config.words[0]].layer_ids[0]
        self.dataset = ConceptDataset(examples, config.resolution, " ".join(config.words), flip_p=config.flip_p,
                                      zoom_out_p=config.zoom_out_p, zoom_out_min=config.zoom_out_min,
                                      shuffle_caption=config.shuffle_caption,
                                      caption_templates=config.caption_templates)

        # 3. Trainable parts: LoRA (PEFT) on both models, concept rows; everything else frozen
        for model in (unet, text_encoder, vae):
            model.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # PEFT draws lora_A from the global CPU generator: seed it here
            torch.random.default_generator.manual_seed(config.seed)
            add_lora(text_encoder, TEXT_ENCODER_TARGETS, config.rank, config.alpha, ADAPTER)
            add_lora(unet, UNET_TARGET_PATTERNS[config.unet_lora_layers], config.rank, config.alpha, ADAPTER)
        self.embedding = ConceptRowsEmbedding(text_encoder.get_input_embeddings(), first_id)
        text_encoder.set_input_embeddings(self.embedding)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        self.device = accelerator.device
        for model in (unet, text_encoder, vae):
            model.to(self.device)
            if self.weight_dtype != torch.float32:
                model.to(self.weight_dtype)  # frozen weights in half precision
        text_lora, unet_lora = lora_parameters(text_encoder, ADAPTER), lora_parameters(unet, ADAPTER)
        self.trainable = [self.embedding.rows, *text_lora, *unet_lora]
        for param in self.trainable:
            param.data = param.data.float()  # trainable weights stay float32 under mixed precision
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            text_encoder.activation_checkpointing_enable()
        optimizer = torch.optim.AdamW(
            [{"params": [self.embedding.rows], "lr": config.lr_embedding},
             {"params": text_lora, "lr": config.lr_text_encoder},
             {"params": unet_lora, "lr": config.lr_unet}],
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = get_scheduler(config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps,
                                          num_training_steps=config.steps)
        self.unet, self.text_encoder, self.optimizer = accelerator.prepare(unet, text_encoder, optimizer)
        if config.compile:
            self.unet = torch.compile(self.unet)  # one graph: processors and recorder compile without breaks
        self.vae, self.tokenizer = vae, tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)

        self.step = 0
        if resume_path:
            self.step = _load_checkpoint(resume_path, self.embedding.rows, self.trainable[1:], self.optimizer,
                                         self.lr_scheduler)
            logger.info("resumed from %s at step %d", resume_path, self.step)
        self.use_reg = config.attn_reg_weight > 0 and config.masks is not None
        if config.attn_reg_weight > 0 and config.masks is None:
            logger.info("attention regularisation is off: it needs subject masks (--masks)")
        self.class_like = [not RANDOM_INIT.match(init) for init in config.init]
        self.word_ids = torch.tensor([self.vocabulary.tokens[w].layer_ids[0] for w in config.words])
        self.embeddings_frozen = _maybe_freeze(self.embedding.rows, config.embedding_norm_limit, False)

    def batch(self, step: int, micro: int) -> tuple[dict, torch.Generator]:
        """The micro-batch of a step and the generator for its noise: both functions of the step only."""
        config, accelerator = self.config, self.accelerator
        g = step_generator(config.seed, step, accelerator.process_index, micro)
        per_step = config.batch_size * config.gradient_accumulation * accelerator.num_processes
        first = step * per_step + (micro * accelerator.num_processes + accelerator.process_index) * config.batch_size
        return self.dataset.batch(batch_indices(config.seed, first, config.batch_size, len(self.dataset)), g), g

    def loss(self, batch: dict, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Masked diffusion loss (+ weighted attention regularisation) of one micro-batch."""
        config, device, dtype = self.config, self.device, self.weight_dtype
        pixels = batch["pixel_values"].to(device, dtype)
        mask = batch["mask"].to(device)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=g) * self.vae.config.scaling_factor
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=g).to(device)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g).to(device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=g).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        regional = config.regional_share > 0 and torch.rand(1, generator=g).item() < config.regional_share
        recorder = None
        if regional:  # one image per UNet call; no attention maps are recorded on these steps
            prediction = self.regional_prediction(noisy.to(dtype), timesteps, batch["captions"], mask)
        else:
            layer_ids = self.vocabulary.layer_input_ids(self.tokenizer, batch["captions"])  # (L, B, T)
            states = self.encode(layer_ids)
            kwargs = {LAYERWISE_KEY: states} if states.shape[0] > 1 else {}
            present = layer_ids[0][:, :, None] == self.word_ids[None, None, :]  # (B, T, K)
            if self.use_reg:  # the concept words' first positions
                recorder = kwargs[RECORDER_KEY] = AttentionMapRecorder(present.float().argmax(dim=1))
            prediction = self.unet(noisy.to(dtype), timesteps, states[0],
                                   cross_attention_kwargs=kwargs or None).sample
        # Gradient checkpointing re-runs layers (and re-records) in backward; the forward's maps come first.
        maps = recorder.maps[: self.num_cross_layers] if recorder else []
        loss = masked_diffusion_loss(prediction, target, mask)  # without mask files: 1 but on a zoomed-out canvas
        logs = {"loss": loss.item(), **({"regional": float(regional)} if config.regional_share > 0 else {})}
        if maps:
            reg = attention_regularization(maps, mask, tuple(latents.shape[-2:]), self.class_like,
                                           config.attn_reg_full_identity, present.any(dim=1).to(device))
            loss = loss + config.attn_reg_weight * reg
            logs["attn_reg"] = reg.item()
        return loss, logs

    def regional_prediction(self, noisy: torch.Tensor, timesteps: torch.Tensor, captions: list[str],
                            mask: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction with each image's caption as a region prompt on a box around its subject and, as
        the global prompt elsewhere, the caption with the class word in place of the concept words (one image per
        call: region masks are shared by a batch)."""
        class_phrase = " ".join(w for w in self.config.init if not RANDOM_INIT.match(w)) or "object"
        predictions = []
        for index, caption in enumerate(captions):
            box = subject_box(mask[index, 0], noisy.shape[-2:])
            global_caption = caption.replace(self.dataset.concept_text, class_phrase)
            global_states = self.encode(self.vocabulary.layer_input_ids(self.tokenizer, [global_caption]))
            region_states = self.encode(self.vocabulary.layer_input_ids(self.tokenizer, [caption]))
            regions = RegionalAttention(region_states[None], box[None].to(noisy.device), trainable=True)
            predictions.append(self.unet(noisy[index:index + 1], timesteps[index:index + 1], global_states[0],
                                         cross_attention_kwargs={REGIONS_KEY: regions}).sample)
        return torch.cat(predictions)

    def encode(self, layer_ids: torch.Tensor) -> torch.Tensor:
        """`(L, B, T)` ids -> `(L, B, T, D)` encodings, all layers in one text-encoder batch."""
        return encode_layerwise(self.text_encoder, layer_ids)

    @torch.no_grad()
    def evaluation_loss(self, seed: int = 12345, batches: int = 4) -> float:
        """Mean loss on fixed batches (same images, noise and timesteps every call): for tests and logs."""
        total = 0.0
        for i in range(batches):
            batch, g = self.batch(10**9 + seed + i, 0)  # a step number training never reaches
            total += self.loss(batch, g)[0].item()
        return total / batches

    def train_step(self) -> dict:
        """One optimizer step (all its micro-batches); returns the last micro-batch's logs."""
        for micro in range(self.config.gradient_accumulation):
            with self.accelerator.accumulate(self.unet, self.text_encoder):
                loss, logs = self.loss(*self.batch(self.step, micro))
                self.accelerator.backward(loss)
                if self.step < self.config.embedding_only_steps:
                    for param in self.trainable[1:]:  # the LoRAs wait: AdamW skips (no decay, no moments) grad None
                        param.grad = None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.embeddings_frozen = _maybe_freeze(self.embedding.rows, self.config.embedding_norm_limit,
                                               self.embeddings_frozen)
        self.step += 1
        return logs

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint of the current step into `<out>.checkpoints/`."""
        path = self.checkpoint_dir / f"step_{self.step:06d}.safetensors"
        _save_checkpoint(path, self.step, self.embedding.rows, self.trainable[1:], self.optimizer, self.lr_scheduler,
                         self.config)
        return path

    def concept(self) -> ConceptFile:
        """The concept as trained so far."""
        rows, per_word = self.embedding.rows.detach().float().cpu(), self.rows_per_word
        return ConceptFile(
            words=tuple(self.config.words),
            embeddings={w: rows[i * per_word:(i + 1) * per_word].clone() for i, w in enumerate(self.config.words)},
            text_encoder_lora=read_lora(self.accelerator.unwrap_model(self.text_encoder), ADAPTER),
            unet_lora=read_lora(self.accelerator.unwrap_model(self.unet), ADAPTER),
            rank=self.config.rank,
            alpha=self.config.alpha,
            base=self.base_fingerprint,
            initializers=tuple(self.config.init),
            mode=self.config.mode,
            config=dataclasses.asdict(self.config),
        )

    def run(self, progress: bool = True) -> Path:
        """Train to `config.steps`, checkpointing on the way; write the concept file and the validation grid."""
        config, accelerator = self.config, self.accelerator
        bar = tqdm(total=config.steps, initial=self.step, disable=not (progress and accelerator.is_main_process),
                   desc="ED-LoRA" if config.mode == "edlora" else "LoRA")
        while self.step < config.steps:
            logs = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", frozen=self.embeddings_frozen)
            every = config.checkpoint_every
            if every and self.step % every == 0 and self.step < config.steps and accelerator.is_main_process:
                self.save_checkpoint()
        bar.close()
        accelerator.wait_for_everyone()
        out = Path(config.out)
        if accelerator.is_main_process:
            save_concept(self.concept(), out)
            logger.info("wrote %s", out)
            if config.validation_steps:
                validation_grid(self.components, accelerator, self.vocabulary, config).save(
                    out.with_suffix(".validation.png"))
        return out


def train(config: TrainConfig, resume: str | None = None, components: dict | None = None,
          progress: bool = True) -> Path:
    """Tune one concept with ED-LoRA (or plain LoRA) and write its concept file.

    Args:
        config: the training config (`load_train_config`).
        resume: a checkpoint file, or "latest" for the newest in `<out>.checkpoints/`.
        components: already-loaded base components instead of loading `config.base` (modified in place).
        progress: show a progress bar.

    Returns:
        The path of the concept file written.
    """
    return EDLoRATrainer(config, components, resume).run(progress)


def _maybe_freeze(rows: torch.nn.Parameter, limit: float, frozen: bool) -> bool:
    """Freeze the concept embeddings for good once their mean L2 norm reaches `limit` (official: 0.55)."""
    if not frozen and limit > 0 and rows.detach().norm(dim=-1).mean() >= limit:
        rows.requires_grad_(False)
        logger.info("concept embeddings reached mean norm %.3f: frozen, LoRA training goes on", limit)
        return True
    return frozen


@torch.no_grad()
def validation_grid(components: dict, accelerator: Accelerator, vocabulary: ConceptVocabulary,
                    config: TrainConfig, seeds: tuple[int, ...] = (0, 1)) -> Image.Image:
    """Sample the validation prompt at each LoRA scale (rows) and seed (columns); returns the grid image."""
    from .pipelines import MixOfShowPipeline  # the pipeline imports training-free modules only

    text_encoder = accelerator.unwrap_model(components["text_encoder"])
    unet = accelerator.unwrap_model(components["unet"])
    pipe = MixOfShowPipeline(vae=components["vae"], text_encoder=text_encoder, tokenizer=components["tokenizer"],
                             unet=unet, scheduler=components["scheduler"])
    pipe.concepts = vocabulary
    pipe.set_progress_bar_config(disable=True)
    prompt = config.validation_prompt.replace(CONCEPT_PLACEHOLDER, " ".join(config.words))
    size = config.resolution
    tiles = []
    for scale in config.validation_scales:
        pipe.adapter_scales = {ADAPTER: scale}
        pipe._apply_adapters()
        with accelerator.autocast():
            for seed in seeds:
                tiles.append(pipe(prompt, height=size, width=size, num_inference_steps=config.validation_steps,
                                  seed=seed).images[0])
    grid = Image.new("RGB", (size * len(seeds), size * len(config.validation_scales)))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % len(seeds)) * size, (i // len(seeds)) * size))
    return grid
