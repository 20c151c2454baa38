"""The `mixofshow` command: thin argument parsing over the library (train, sample, inspect, import-official)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import MixOfShowError

# transformers warns on import about optional image backends we never use; the CLI keeps its output clean.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (either --model, or --base with optional --concept files)")
    model.add_argument("--model", help="a model folder (diffusers pipeline, e.g. a fused model)")
    model.add_argument("--base", help="base model: diffusers folder, .safetensors/.ckpt file, or Hub id")
    model.add_argument("--concept", action="append", default=[], help="concept file to load (repeatable)")
    model.add_argument("--scale", type=float, nargs="+", default=None,
                       help="LoRA scale per concept (one value applies to all; default 1.0)")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    _add_model_flags(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--prompt", help="the prompt (or give --layout)")
    sampling.add_argument("--layout", help="a layout file (YAML/JSON): global prompt, regions, spatial conditions, "
                                           "size, steps, guidance, scheduler, seed")
    sampling.add_argument("--save-layout-preview", action="store_true",
                          help="with --layout: also write the regions drawn over the condition image to "
                               "OUT_STEM.layout.png (written before any model loads)")
    sampling.add_argument("--negative-prompt", default="")
    sampling.add_argument("--steps", type=int, default=50)
    sampling.add_argument("--guidance", type=float, default=7.5)
    sampling.add_argument("--height", type=int, default=None)
    sampling.add_argument("--width", type=int, default=None)
    sampling.add_argument("--seed", type=int, default=None,
                          help="seeds a CPU generator: same seed, same image anywhere (default: the layout's, or 0)")
    sampling.add_argument("--scheduler", default=None, help="ddim, dpm++, euler, euler_a or pndm")
    sampling.add_argument("--num-images", type=int, default=1)
    sampling.add_argument("--out", default="sample.png", help="image file; several images get _0, _1, ... suffixes")
    sampling.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    sampling.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                          help="weights dtype (default: float16 on cuda, float32 on cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixofshow", description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info messages")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="tune one concept with ED-LoRA (or plain LoRA)")
    train.add_argument("config", nargs="?", help="YAML/JSON training config; flags override its fields")
    train.add_argument("--base")
    train.add_argument("--data", help="folder of images with same-name .txt captions using <TOK>")
    train.add_argument("--masks", help="folder of .png subject masks with the images' base names")
    train.add_argument("--words", help="concept words, e.g. '<hina1>+<hina2>'")
    train.add_argument("--init", help="initialisers, e.g. '<rand-0.013>+girl'")
    train.add_argument("--mode", choices=["edlora", "lora"])
    train.add_argument("--steps", type=int)
    train.add_argument("--embedding-only-steps", type=int, help="first steps in which only the concept embeddings "
                                                                "learn (pivotal tuning; default 0)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--resolution", type=int)
    train.add_argument("--rank", type=int)
    train.add_argument("--unet-lora-layers", help="UNet layers with LoRA: attention (official), cross_attention or "
                                                  "attention_ff (attention and feed-forward)")
    train.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    train.add_argument("--gradient-accumulation", type=int)
    train.add_argument("--gradient-checkpointing", action="store_true", default=None)
    train.add_argument("--checkpoint-every", type=int)
    train.add_argument("--validation-steps", type=int, help="sampling steps of the validation grid (0 = none)")
    train.add_argument("--zoom-out-p", type=float, help="share of crops shrunk onto a random place (learns the "
                                                        "concept small too; see zoom_out_min)")
    train.add_argument("--seed", type=int)
    train.add_argument("--out", help="concept file to write (.safetensors)")
    train.add_argument("--resume", help="a checkpoint file, or 'latest'")

    sample = commands.add_parser("sample", help="sample images from a base model with concepts, or a fused model")
    _add_sampling_flags(sample)

    fuse = commands.add_parser("fuse", help="fuse any number of concept files into one model folder")
    fuse.add_argument("config", nargs="?", help="YAML/JSON fusion config, or the official fusion JSON list")
    fuse.add_argument("--base")
    fuse.add_argument("--concept", action="append", default=[], help="concept file (repeatable)")
    fuse.add_argument("--stats", action="append", default=[],
                      help="statistics file from `mixofshow stats` (repeatable; matched to its concept)")
    fuse.add_argument("--method", choices=["weight", "gradient", "zip", "lbfgs"])
    fuse.add_argument("--sampling-steps", type=int, help="steps of each concept's sampling run (default 20)")
    fuse.add_argument("--out", help="output folder")
    fuse.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder")
    fuse.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    fuse.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                      help="dtype of the model the statistics run in and the fused model is saved in (default: "
                           "float16 on cuda, float32 on cpu); solves are float64 whatever it is")

    stats = commands.add_parser("stats", help="compute a concept's fusion statistics on the client")
    stats.add_argument("config", nargs="?", help="YAML/JSON fusion config whose settings the center will use")
    stats.add_argument("--base")
    stats.add_argument("--concept", required=True)
    stats.add_argument("--unet-scale", type=float, default=None)
    stats.add_argument("--text-encoder-scale", type=float, default=None)
    stats.add_argument("--sampling-steps", type=int)
    stats.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    stats.add_argument("--device", default=None)
    stats.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="the dtype the center fuses in (default: float16 on cuda, float32 on cpu)")

    inspect = commands.add_parser("inspect", help="show what a concept file holds")
    inspect.add_argument("file")

    convert = commands.add_parser("import-official", help="convert an official Mix-of-Show ED-LoRA .pth")
    convert.add_argument("file")
    convert.add_argument("--out", required=True, help="the concept file to write (.safetensors)")
    convert.add_argument("--alpha", type=float, default=1.0, help="the official LoRA alpha it was trained with")

    export = commands.add_parser("export", help="a concept file for diffusers / kohya / A1111, or a fused model "
                                                "folder as one original-layout checkpoint")
    export.add_argument("source", help="concept file (or LoRA file); with --format single-file, a model folder")
    export.add_argument("--format", required=True, choices=["diffusers", "kohya", "a1111", "single-file"],
                        help="diffusers: a LoRA folder + textual inversions; kohya / a1111: one LoRA file + A1111 "
                             "embeddings; single-file: a fused folder as one .safetensors checkpoint")
    export.add_argument("--out", required=True,
                        help="diffusers: a folder; kohya / a1111: a .safetensors file or a folder; single-file: a "
                             ".safetensors file")
    export.add_argument("--name", help="the LoRA's name (default: the concept file's name)")

    layout = commands.add_parser("layout", help="regional-sampling layouts: convert the official format, preview")
    layout_actions = layout.add_subparsers(dest="layout_action", required=True)
    official = layout_actions.add_parser("convert", help="the official Mix-of-Show prompt_rewrite as a layout file")
    official.add_argument("--official", required=True,
                          help="'[prompt]-*-[negative prompt]-*-[y0, x0, y1, x1]|...' (pixels, y first)")
    official.add_argument("--width", type=int, required=True)
    official.add_argument("--height", type=int, required=True)
    official.add_argument("--prompt", default="", help="the global (context) prompt")
    official.add_argument("--negative-prompt", default="", help="the global negative prompt")
    official.add_argument("--out", required=True, help="layout file to write (.yaml, or .json)")
    preview = layout_actions.add_parser("preview", help="draw a layout's regions and prompts on an image")
    preview.add_argument("layout", help="YAML/JSON layout file")
    preview.add_argument("--out", required=True, help="image file to write (.png, .jpg, ...)")

    demo = commands.add_parser("demo", help="the whole mission on the bundled toy world: tune three concepts, fuse, "
                                            "sample, score, and write an HTML report")
    demo.add_argument("--out", required=True, help="output folder (index.html, metrics.json, images, models)")
    demo.add_argument("--fast", action="store_true", help="a few steps at tiny sizes (checks it end to end)")
    demo.add_argument("--base", help="a toy-world folder from scripts/train_toyworld.py (default: the bundled one)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the rendered data, the tuning and the sampling")
    demo.add_argument("--detail-strength", type=float, default=0.0,
                      help="also show the compositions after a region detail pass of this strength, e.g. 0.85 "
                           "(default 0: not)")

    studio = commands.add_parser("studio", help="a local web page to draw a layout's regions, sample and download it")
    _add_model_flags(studio)
    studio.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; anyone who can reach "
                             "another address can use the model)")
    studio.add_argument("--port", type=int, default=8765, help="port to listen on (0: a free one)")
    studio.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    studio.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights dtype (default: float16 on cuda, float32 on cpu)")
    return parser


def run_train(args) -> None:
    from .config import load_train_config
    from .tokens import split_words
    from .train import train

    overrides = {
        "base": args.base, "data": args.data, "masks": args.masks, "mode": args.mode, "steps": args.steps,
        "embedding_only_steps": args.embedding_only_steps,
        "batch_size": args.batch_size, "resolution": args.resolution, "rank": args.rank,
        "unet_lora_layers": args.unet_lora_layers,
        "mixed_precision": args.mixed_precision, "gradient_accumulation": args.gradient_accumulation,
        "gradient_checkpointing": args.gradient_checkpointing, "checkpoint_every": args.checkpoint_every,
        "validation_steps": args.validation_steps, "zoom_out_p": args.zoom_out_p, "seed": args.seed, "out": args.out,
        "words": list(split_words(args.words)) if args.words else None,
        "init": list(split_words(args.init)) if args.init else None,
    }
    if args.words and not args.init:
        overrides["init"] = ["<rand-0.013>"] * len(overrides["words"])
    config = load_train_config(args.config, **overrides)
    out = train(config, resume=args.resume, progress=not args.quiet)
    print(f"wrote {out}")


def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def run_sample(args) -> None:
    from .pipelines import SCHEDULERS
    from .pipelines.pipeline_mixofshow import load_sampling_pipeline

    if args.num_images < 1:
        raise MixOfShowError(f"--num-images must be at least 1, got {args.num_images}")
    if args.scheduler and args.scheduler not in SCHEDULERS:
        raise MixOfShowError(f"unknown scheduler {args.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
    if bool(args.prompt) == bool(args.layout):
        raise MixOfShowError("give exactly one of --prompt TEXT or --layout FILE")
    layout = _read_layout(args) if args.layout else None
    texts = [args.prompt, args.negative_prompt]
    if layout:
        texts = [layout.prompt, layout.negative_prompt, *(r.prompt for r in layout.regions),
                 *layout.region_negative_prompts(), *(r.detail_prompt for r in layout.regions if r.detail_prompt)]
    device, dtype = _device_and_dtype(args)
    pipe = load_sampling_pipeline(args.model, args.base, args.concept, args.scale, device, dtype, texts)
    if args.scheduler:
        pipe.use_scheduler(args.scheduler)
    pipe.set_progress_bar_config(disable=args.quiet)
    if layout:
        images = pipe.sample_layout(layout, num_images=args.num_images).images
    else:
        images = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance,
                      num_images_per_prompt=args.num_images, seed=0 if args.seed is None else args.seed).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        image.save(path)
        print(f"wrote {path}")


def _read_layout(args):
    """The layout file, checked, with --seed / --scheduler overriding its own; its preview written if asked."""
    import dataclasses

    from .layout import draw_layout_preview, load_layout

    layout = load_layout(args.layout)
    layout = dataclasses.replace(layout, seed=layout.seed if args.seed is None else args.seed,
                                 scheduler=args.scheduler or layout.scheduler)
    if args.save_layout_preview:
        out = Path(args.out)
        preview = out.with_name(f"{out.stem}.layout.png")
        preview.parent.mkdir(parents=True, exist_ok=True)
        draw_layout_preview(layout).save(preview)
        print(f"wrote {preview}")
    return layout


def _load_base_on(args):
    """Base components of `args.base_path` on the chosen device."""

    from .models import load_base_components

    device, dtype = _device_and_dtype(args)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # under `accelerate launch`: one device per process
        from accelerate import PartialState

        device = PartialState().device
    components = load_base_components(args.base_path, dtype)
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(device)
    return components


def run_fuse(args) -> None:
    from .config import load_fuse_config
    from .fusion.fuse import fuse

    concepts = [{"path": c} for c in args.concept]
    if args.stats:
        if len(args.stats) != len(args.concept):
            raise MixOfShowError(f"--stats needs one file per --concept ({len(args.concept)}), got {len(args.stats)}")
        for entry, stats in zip(concepts, args.stats):
            entry["stats"] = stats
    config = load_fuse_config(args.config, concepts=concepts, base=args.base, method=args.method, out=args.out,
                              sampling_steps=args.sampling_steps, overwrite=args.overwrite)
    args.base_path = config.base
    out = fuse(config, components=_load_base_on(args), progress=not args.quiet, copy_components=False)
    print(f"wrote {out}")


def run_stats(args) -> None:
    from .config import load_fuse_config, read_document
    from .fusion.fuse import compute_statistics

    entry = {"path": args.concept}
    for key in ("unet_scale", "text_encoder_scale"):
        if getattr(args, key) is not None:
            entry[key] = getattr(args, key)
    settings = read_document(args.config, allow_list=True) if args.config else {}
    settings = settings if isinstance(settings, dict) else {}  # the official list holds no settings
    settings = {k: v for k, v in settings.items() if k not in ("concepts", "out")}
    settings.update({k: v for k, v in (("base", args.base), ("sampling_steps", args.sampling_steps)) if v is not None})
    config = load_fuse_config(None, concepts=[entry], out=args.out, **settings)
    args.base_path = config.base
    print(f"wrote {compute_statistics(config, args.out, components=_load_base_on(args), copy_components=False)}")


def run_inspect(args) -> None:
    from .concept_file import load_concept

    concept = load_concept(args.file)
    meta = concept.metadata()
    print(f"{args.file}: {concept.mode} concept, words {' '.join(concept.words)}")
    for word in concept.words:
        rows = concept.embeddings[word]
        print(f"  {word}: {rows.shape[0]} layer-wise embedding(s) of size {rows.shape[1]}, "
              f"mean norm {rows.norm(dim=-1).mean():.3f}")
    for part, weights in (("text encoder", concept.text_encoder_lora), ("unet", concept.unet_lora)):
        params = sum(a.numel() + b.numel() for a, b in weights.values())
        print(f"  LoRA on {part}: {len(weights)} layers, {params:,} parameters")
    print(f"  rank {concept.rank}, alpha {concept.alpha:g} (scale alpha/rank = {concept.alpha / concept.rank:g})")
    print(f"  initialisers: {', '.join(concept.initializers) or 'unknown'}")
    print(f"  base model: {json.dumps(meta['base'])}")
    if concept.config:
        print(f"  training config: {json.dumps(concept.config)}")


def run_import(args) -> None:
    from .concept_file import import_official, save_concept

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise MixOfShowError(f"--out must name a .safetensors file, got {out}")
    save_concept(import_official(args.file, alpha=args.alpha), out)
    print(f"wrote {out}")


def run_export(args) -> None:
    from .interop import export_concept, export_single_file

    if args.format == "single-file":
        result = export_single_file(args.source, args.out)
    else:
        if not Path(args.source).is_file():
            raise MixOfShowError(f"concept file {args.source} does not exist")
        result = export_concept(args.source, args.format, args.out, name=args.name)
    for path in result.files:
        print(f"wrote {path}")
    for note in result.notes:
        print(f"note: {note}")


def run_demo(args) -> None:
    import dataclasses

    from .demo import METRICS_FILE, DemoConfig, run_demo, summary_line

    make = DemoConfig.fast if args.fast else DemoConfig
    tuning = dataclasses.replace(make(out=args.out).tuning, seed=args.seed)
    try:
        config = make(out=args.out, base=args.base, seed=args.seed, tuning=tuning,
                      detail_strength=args.detail_strength)
    except ValueError as error:
        raise MixOfShowError(f"demo: {error}") from None
    report = run_demo(config, progress=not args.quiet)
    print(summary_line(report.with_name(METRICS_FILE)))
    print(f"wrote {report}")


def run_layout(args) -> None:
    from PIL import Image

    from .layout import draw_layout_preview, layout_from_official, load_layout

    if args.layout_action == "convert":
        layout = layout_from_official(args.official, args.width, args.height, prompt=args.prompt,
                                      negative_prompt=args.negative_prompt)
        print(f"wrote {layout.save(args.out)}")
        return
    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise MixOfShowError(f"--out must name an image file (.png, .jpg, ...), got {out}")
    image = draw_layout_preview(load_layout(args.layout))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
    except OSError as error:
        raise MixOfShowError(f"could not write the preview to {out}: {error}") from None
    print(f"wrote {out}")


def run_studio(args) -> None:
    from .pipelines.pipeline_mixofshow import load_sampling_pipeline
    from .studio import Studio, make_server

    device, dtype = _device_and_dtype(args)
    pipe = load_sampling_pipeline(args.model, args.base, args.concept, args.scale, device, dtype)
    server = make_server(Studio(pipe, source=args.model or args.base), host=args.host, port=args.port)
    print(f"studio at {server.url} (Ctrl+C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


COMMANDS = {"train": run_train, "sample": run_sample, "fuse": run_fuse, "stats": run_stats, "inspect": run_inspect,
            "import-official": run_import, "layout": run_layout, "demo": run_demo, "studio": run_studio,
            "export": run_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        COMMANDS[args.command](args)
    except MixOfShowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
