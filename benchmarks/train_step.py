"""ED-LoRA training-step speed and memory on an SD1.5-shaped random-weight model, against a reference in the same run.

The reference is the official trainer's way of computing a step: the layer-wise prompts encoded one text-encoder
call per layer, and every attention (self and cross) with a materialised softmax. "ours" encodes all layers in one
batch and uses scaled-dot-product attention, materialising only the cross-attention maps that the attention
regularisation reads.

Run:
    python benchmarks/train_step.py                       # CPU: 256x256, batch 2, float32
    python benchmarks/train_step.py --device cuda --resolution 512 --precision fp16
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from mixofshow.attention import install_processors
from mixofshow.config import load_train_config
from mixofshow.testing import sd15_components, tiny_components
from mixofshow.tokens import encode_layerwise
from mixofshow.train import EDLoRATrainer


class ReferenceTrainer(EDLoRATrainer):
    """The official trainer's step: one text-encoder call per layer, materialised softmax in every attention."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_processors(self.accelerator.unwrap_model(self.unet), explicit_softmax=True)

    def encode(self, layer_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([encode_layerwise(self.text_encoder, ids[None])[0] for ids in layer_ids])


def write_dataset(root: Path, resolution: int, count: int = 4) -> tuple[Path, Path]:
    data, masks = root / "data", root / "masks"
    data.mkdir()
    masks.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
        mask = torch.zeros(resolution, resolution, dtype=torch.uint8)
        mask[resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 255
        Image.fromarray(mask.numpy()).save(masks / f"{i}.png")
        (data / f"{i}.txt").write_text("a photo of <TOK>, standing")
    return data, masks


def measure(trainer_class, args, data: Path, masks: Path, out: Path, compiled: bool = False) -> dict:
    components = sd15_components() if args.model == "sd15" else tiny_components()
    config = load_train_config(
        None, base="random", data=str(data), masks=str(masks), out=str(out), words=["<v1>", "<v2>"],
        init=["<rand-0.013>", "man"], resolution=args.resolution, batch_size=args.batch_size,
        mixed_precision=args.precision, gradient_checkpointing=args.gradient_checkpointing, steps=10**6,
        validation_steps=0, compile=compiled,
    )
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = trainer_class(config, components=components)
    for _ in range(args.warmup):
        trainer.train_step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    del trainer, components
    gc.collect()
    return {"s_per_step": seconds, "gpu_gib": gpu}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="reference,ours", help="any of reference, ours, ours+compile")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, masks = write_dataset(Path(tmp), args.resolution)
        for name in args.variants.split(","):
            trainer_class = ReferenceTrainer if name == "reference" else EDLoRATrainer
            result = measure(trainer_class, args, data, masks, Path(tmp) / f"{name}.safetensors",
                             compiled=name.endswith("+compile"))
            rows.append((name, result))
            print(f"  measured {name}: {result['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    reference = dict(rows).get("reference", rows[0][1])["s_per_step"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nED-LoRA training step, {args.model} random weights, {args.resolution}x{args.resolution}, batch "
          f"{args.batch_size}, precision {args.precision}, attention regularisation on, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {device}, torch {torch.__version__}")
    print("| variant | s/step | steps/s | peak GPU GiB | speed vs reference |")
    print("|---|---|---|---|---|")
    for name, result in rows:
        s = result["s_per_step"]
        print(f"| {name} | {s:.3f} | {1 / s:.2f} | {result['gpu_gib']:.2f} | {reference / s:.2f}x |")
    print(f"peak host RSS of the process (all variants): {host_gib:.1f} GiB")



if __name__ == "__main__":
    main()
