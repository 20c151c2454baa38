"""Regional sampling cost: time per image with 1, 3 and 6 regions against plain sampling of the same size, same run.

Three ways to sample, on the same random model, seed, size and steps:

- `plain`: `MixOfShowPipeline` with the global prompt only (the reference of the ratio columns);
- `ours`: the same call with R region prompts (vertical strips, each with its own negative prompt): per layer, one
  attention call in which each prompt is attended only from the positions it covers (regions that tile the image
  cost about one plain attention), the outputs blended by the masks;
- `isolated`: `ours` with the regions also kept apart in self-attention (`RegionPrompts.isolate`, not in the
  official method): the cost of the masked self-attention;
- `naive`: the official code's way, one region at a time: select the region's pixels, project their queries,
  attend to the region prompt, write the result back (a processor subclass defined here, for reference only).

It also checks that `ours` and `naive` give the same latents (binary masks: they compute the same thing).

Run:
    python benchmarks/regional.py --model tiny                                  # CPU, 32x32
    python benchmarks/regional.py --model sd15 --device cuda --dtype float16    # GPU, 512x512
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import diffusers
import torch
import torch.nn.functional as F

from mixofshow.attention import MixOfShowAttnProcessor, RegionalAttention
from mixofshow.pipelines import MixOfShowPipeline
from mixofshow.pipelines.regional import RegionPrompts
from mixofshow.testing import sd15_components, tiny_components

GOAL = 1.15  # 3 regions at most 1.15x plain sampling
PROMPTS = ["a girl in a red coat", "a boy with a blue hat", "a brown dog", "a small cat", "an old man, beard",
           "a woman in a green dress"]


class NaiveRegionalProcessor(MixOfShowAttnProcessor):
    """The reference: each region's pixels attend to its prompt in a separate pass, as the official code does."""

    batch_regions = False

    def apply_regions(self, attn, query, hidden_states, regional: RegionalAttention):
        batch, heads, tokens, head_dim = query.shape
        layers = regional.states.shape[1]
        weights, cover = regional.weights(tokens, hidden_states)
        out = hidden_states * (1 - cover)
        for region in range(regional.states.shape[0]):
            inside = weights[region, 0, :, 0] > 0
            states = regional.states[region, self.layer_index if layers > 1 else 0].to(query.dtype)
            key, value = (x.view(batch, -1, heads, head_dim).transpose(1, 2)
                          for x in (attn.to_k(states), attn.to_v(states)))
            region_query = query[:, :, inside]
            region_out = F.scaled_dot_product_attention(region_query, key, value)
            region_out = region_out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
            out[:, inside] = out[:, inside] + weights[region, :, inside] * region_out
        return out


def use_processors(pipe: MixOfShowPipeline, processor_class) -> None:
    processors = {}
    for key, processor in pipe.unet.attn_processors.items():
        processors[key] = processor_class(processor.layer_index)
    pipe.unet.set_attn_processor(processors)


def strips(count: int, height: int, width: int) -> torch.Tensor:
    """`count` vertical strips covering the image: `(count, height, width)` masks."""
    masks = torch.zeros(count, height, width)
    edges = [round(i * width / count) for i in range(count + 1)]
    for i in range(count):
        masks[i, :, edges[i]:edges[i + 1]] = 1
    return masks


def time_call(pipe, args, regions, device) -> tuple[float, torch.Tensor]:
    """Fastest and median wall seconds of `args.repeat` timed images (after one untimed warm-up), and the latents."""
    def run():
        return pipe("a group photo, best quality", negative_prompt="lowres", height=args.size, width=args.size,
                    num_inference_steps=args.steps, guidance_scale=7.5, seed=0, output_type="latent",
                    progress=False, regions=regions).images

    run()
    seconds = []
    for _ in range(args.repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        latents = run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 32 tiny, 512 sd15)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--regions", default="1,3,6")
    parser.add_argument("--repeat", type=int, default=3, help="timed images per setting; the median is reported")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    args.size = args.size or (512 if args.model == "sd15" else 32)
    components = sd15_components() if args.model == "sd15" else tiny_components()
    pipe = MixOfShowPipeline(**components).to(args.device, getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)

    # Plain sampling is timed again before every region count (clocks and launch overheads drift on a GPU); each
    # row is compared with the median of all plain timings.
    plains, rows = [], []
    for count in (int(c) for c in args.regions.split(",")):
        plains.append(time_call(pipe, args, None, args.device)[0])
        regions = RegionPrompts([PROMPTS[i % len(PROMPTS)] for i in range(count)], ["lowres, bad anatomy"] * count,
                                strips(count, args.size, args.size))
        ours, ours_latents = time_call(pipe, args, regions, args.device)
        isolated = time_call(pipe, args, dataclasses.replace(regions, isolate=True), args.device)[0]
        use_processors(pipe, NaiveRegionalProcessor)
        naive, naive_latents = time_call(pipe, args, regions, args.device)
        use_processors(pipe, MixOfShowAttnProcessor)
        difference = (ours_latents.float() - naive_latents.float()).abs().max().item()
        rows.append((count, ours, isolated, naive, difference))
    plain = statistics.median(plains)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nRegional sampling, {args.model} random weights in {args.dtype}, {args.size}x{args.size}, "
          f"{args.steps} steps, guidance 7.5, {device}, torch {torch.__version__}; median of {args.repeat} images")
    print(f"plain sampling: {plain:.3f} s per image (median of the timings before each row: "
          f"{', '.join(f'{t:.3f}' for t in plains)} s)")
    print("| regions | ours s | ours / plain | isolated s | isolated / plain | naive (one region at a time) s | "
          "naive / plain | ours vs naive speed-up | max abs latent difference ours - naive |")
    print("|---|---|---|---|---|---|---|---|---|")
    for count, ours, isolated, naive, difference in rows:
        print(f"| {count} | {ours:.3f} | {ours / plain:.3f}x | {isolated:.3f} | {isolated / plain:.3f}x | "
              f"{naive:.3f} | {naive / plain:.3f}x | {naive / ours:.2f}x | {difference:.2e} |")
    three = [r for r in rows if r[0] == 3]
    if three:
        verdict = "met" if three[0][1] / plain <= GOAL else "NOT met"
        print(f"goal: 3 regions at most {GOAL}x plain sampling -> {three[0][1] / plain:.3f}x, {verdict}")


if __name__ == "__main__":
    main()
