"""Center-node fusion speed, memory and objective: closed-form gradient fusion against the paper's L-BFGS, same run.

For each number of concepts n, `mixofshow.fusion.fuse.fuse` fuses n random ED-LoRA concepts
(`random_concept(..., lora_std=0.1, text_encoder_lora_std=0.01)`, words `<k{i}a> <k{i}b>`) into a random
`tiny` or SD1.5-shaped base model, once per method:

- `lbfgs`: the paper's solver (L-BFGS per layer from W0, 500 iterations for text-encoder and cross-attention K/V
  layers, 50 for the rest; `--lbfgs-*-iterations` lowers them for a CPU run, which favours the reference in time),
  keeping every concept's delta and Gram matrix per layer; the reference of the speed-up column. It runs on the same
  Gram statistics as ours, not on the raw features as the official code does, so its iterations are already cheaper
  than the official ones: its time here is a lower bound of the official solver's;
- `gradient`: ours, the same least-squares problems solved in closed form from streamed Gram sums;
- `weight`: weight fusion (no statistics, no solve): the floor of a `fuse` call (model copies, adapters, saving).

Per run it measures the wall seconds of the whole `fuse` call (statistics, solves, saving the fused folder) and the
process's CPU seconds over it, the seconds spent in the per-layer solves (`LayerProblems.solve`, timed by wrapping
it here), the growth of host memory (peak RSS minus the RSS just before the call: the kernel's high-water mark,
reset through /proc/self/clear_refs, and an RSS sampler thread every 50 ms), peak GPU memory on cuda, and the
report's summed objectives: at the fused weights, at W0 and at weight fusion. By default the base components are
built once and every `fuse` call gets that same object (fuse deep-copies it itself); `--base-from-disk` saves them
once and lets each call load the folder, as the CLI does. `--host-limit-gib` ends a run whose process RSS passes
the limit and records it as aborted (a lower bound), instead of meeting the kernel's OOM killer. On a CPU shared
with other work, `--threads 1` avoids OpenMP spin-waits that slow 2-thread runs by an order of magnitude.

Run:
    python benchmarks/fusion.py --model tiny --concepts 1,3,6,14 --threads 1 --repeat 3      # the paper's 500/50
    python benchmarks/fusion.py --model sd15 --sampling-size 128 --sampling-steps 4 --concepts 1,3 \\
        --lbfgs-text-iterations 50 --lbfgs-unet-iterations 10 --threads 1 --host-limit-gib 22  # CPU, reduced
    python benchmarks/fusion.py --model sd15 --device cuda --concepts 1,3,6                   # GPU, 512x512, 20 steps
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline

from mixofshow.concept_file import save_concept
from mixofshow.config import load_fuse_config
from mixofshow.fusion import fuse as fuse_module
from mixofshow.testing import random_concept, sd15_components, tiny_components

_tqdm = fuse_module.tqdm


def _quiet_tqdm(*args, **kwargs):
    """fuse's progress bars, always off: the per-layer solve bars ignore `progress`."""
    kwargs["disable"] = True
    return _tqdm(*args, **kwargs)


fuse_module.tqdm = _quiet_tqdm

GIB = 2**30
PAGE = os.sysconf("SC_PAGE_SIZE")
PAPER_TEXT_ITERATIONS, PAPER_UNET_ITERATIONS = 500, 50


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_mark() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the kernel, so the next run's baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler(threading.Thread):
    """Peak RSS over a run, sampled every `interval` seconds; interrupts the main thread once RSS passes `limit`
    (bytes), so that a run too big for the machine ends as a row instead of the kernel's OOM killer."""

    def __init__(self, interval: float = 0.05, limit: float | None = None):
        super().__init__(daemon=True)
        self.interval, self.peak, self.done = interval, rss_bytes(), threading.Event()
        self.limit, self.exceeded = limit, False

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())
            if self.limit and self.peak > self.limit and not self.exceeded:
                self.exceeded = True
                _thread.interrupt_main()

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


class PhaseTimer:
    """While open, sums the wall seconds spent in the phases of a `fuse` call: the concepts' statistics runs, the
    per-layer solves and writing the fused folder (by wrapping the functions that do them)."""

    def __init__(self, cuda: bool):
        self.phases = {"statistics": (fuse_module, "record_statistics"),
                       "solve": (fuse_module.LayerProblems, "solve"), "save": (fuse_module, "save_model_folder")}
        self.cuda = cuda
        self.seconds = dict.fromkeys(self.phases, 0.0)
        self.originals = {}

    def __enter__(self):
        for phase, (owner, name) in self.phases.items():
            self.originals[phase] = original = getattr(owner, name)
            setattr(owner, name, self._timed(phase, original))
        return self

    def _timed(self, phase: str, original):
        def timed(*args, **kwargs):
            sync(self.cuda)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                sync(self.cuda)
                self.seconds[phase] += time.perf_counter() - start

        return timed

    def __exit__(self, *exc) -> None:
        for phase, (owner, name) in self.phases.items():
            setattr(owner, name, self.originals[phase])


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def make_concepts(components: dict, count: int, root: Path) -> list[Path]:
    paths = []
    for i in range(count):
        concept = random_concept(components, (f"<k{i}a>", f"<k{i}b>"), seed=i, lora_std=0.1,
                                 text_encoder_lora_std=0.01)
        paths.append(save_concept(concept, root / f"concept{i}.safetensors"))
    return paths


def measure(components: dict | None, base: str, paths: list[Path], method: str, args, out: Path,
            **overrides) -> dict:
    """One `fuse` call: seconds, solve seconds, host/GPU memory growth, report totals."""
    fields = {"method": method, "sampling_size": args.sampling_size, "sampling_steps": args.sampling_steps,
              "lbfgs_text_iterations": args.lbfgs_text_iterations,
              "lbfgs_unet_iterations": args.lbfgs_unet_iterations, "overwrite": True}
    if args.rcond is not None:
        fields["rcond"] = args.rcond
    fields.update(overrides)
    config = load_fuse_config(None, concepts=[str(p) for p in paths], base=base, out=str(out),
                              **fields)
    cuda = args.device == "cuda"
    release_freed_memory()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    before = rss_bytes()
    exact = reset_high_water_mark()
    sampler = RssSampler(limit=args.host_limit_gib * GIB if args.host_limit_gib else None)
    sampler.start()
    folder = None
    with PhaseTimer(cuda) as phases:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            folder = fuse_module.fuse(config, components=components, progress=False)
            sync(cuda)
        except KeyboardInterrupt:
            if not sampler.exceeded:
                raise
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = max(sampler.stop(), high_water_mark() if exact else 0)
    report = {}
    if folder is not None:
        report = json.loads((folder / fuse_module.REPORT_FILE).read_text())
        shutil.rmtree(folder)
    for leftover in out.parent.glob(f".{out.name}.*"):  # an interrupted run's half-built folder
        shutil.rmtree(leftover, ignore_errors=True)
    return {
        "n": len(paths), "method": method, "aborted": folder is None, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "load_average": os.getloadavg()[0], "solve_seconds": phases.seconds["solve"],
        "statistics_seconds": phases.seconds["statistics"], "save_seconds": phases.seconds["save"],
        "host_peak_gib": (peak - before) / GIB, "host_before_gib": before / GIB,
        "gpu_peak_gib": (torch.cuda.max_memory_allocated() - gpu_before) / GIB if cuda else None,
        "totals": report.get("totals", {}),
        "layer_objectives": {f"{part}.{path}": (row["objective_fused"], row["objective_base"])
                             for part, rows in report.get("layers", {}).items() for path, row in rows.items()},
    }


def source_state() -> str:
    """The commit the benchmark ran on, and whether src/ had uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}{' + uncommitted changes in src/' if dirty else ''}"


def fmt(value, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[dict], args, source: str) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    size = args.sampling_size or "model default"
    iterations = f"{args.lbfgs_text_iterations}/{args.lbfgs_unet_iterations}"
    if "lbfgs" not in (r["method"] for r in rows):
        iterations = "not run"
    elif (args.lbfgs_text_iterations, args.lbfgs_unet_iterations) != (PAPER_TEXT_ITERATIONS, PAPER_UNET_ITERATIONS):
        iterations += (f" (REDUCED from the paper's {PAPER_TEXT_ITERATIONS}/{PAPER_UNET_ITERATIONS}: favours "
                       "lbfgs in time)")
    else:
        iterations += " (the paper's)"
    how = ("loaded by each fuse call from a saved folder (host peak includes the load)" if args.base_from_disk
           else "passed in memory (fuse deep-copies it; the host peak excludes the caller's copy)")
    print(f"\nFusion, {args.model} random weights in {args.dtype} (base {how}), sampling {size} px x "
          f"{args.sampling_steps} steps, L-BFGS iterations text+K/V/other UNet {iterations}, {device}, "
          f"torch {torch.__version__}, "
          f"mixofshow at {source}")
    print("| n | method | seconds | CPU s | statistics s | solve s | save s | speed-up vs lbfgs (wall / CPU) "
          "| host peak GiB | GPU peak GiB | objective fused | objective W0 | objective weight fusion | fused / W0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = {r["n"]: r for r in rows if r["method"] == "lbfgs"}
    for r in rows:
        totals = r["totals"]
        fused, base = totals.get("objective_fused"), totals.get("objective_base")
        ref, over = reference.get(r["n"]), "> " if r["aborted"] else ""
        if ref and not r["aborted"]:
            bound = ">" if ref["aborted"] else ""
            speed = (f"{bound}{ref['seconds'] / r['seconds']:.2f}x / {bound}"
                     f"{ref['cpu_seconds'] / r['cpu_seconds']:.2f}x")
        else:
            speed = "—"
        seconds = f"{over}{r['seconds']:.1f}" + (f" (aborted: RSS over {args.host_limit_gib} GiB)" if over else "")
        print(f"| {r['n']} | {r['method']} | {seconds} | {over}{r['cpu_seconds']:.1f} | "
              f"{over}{r.get('statistics_seconds', 0):.2f} | {over}{r['solve_seconds']:.2f} | "
              f"{over}{r.get('save_seconds', 0):.2f} | {speed} | {over}{r['host_peak_gib']:.2f} | "
              f"{fmt(r['gpu_peak_gib'], '.2f')} "
              f"| {fmt(fused, '.4e')} | {fmt(base, '.4e')} | {fmt(totals.get('objective_weight_fusion'), '.4e')} "
              f"| {fmt(fused / base if fused is not None and base else None, '.4f')} |")
    print(f"seconds = wall time of the fuse call (fastest of {args.repeat}); CPU s = this process's CPU time over "
          "that call (all threads); statistics / solve / save s = wall time in the concepts' statistics runs, the "
          "per-layer solves and writing the fused folder; host peak = peak RSS during the "
          "call minus the RSS just before it (largest of the repeats); weight = no statistics and no solve (the "
          "floor of a fuse call)")
    for n in sorted({r["n"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["n"] == n and not r["aborted"]}
        if "lbfgs" in by_method and "gradient" in by_method:
            # Only layers whose problem is the same in both runs: the cross-attention K/V inputs are each method's
            # own fused text encoder's encodings, so those problems differ between the runs. A layer counts as
            # above the reference beyond 1e-9 of its objective at W0 (the Gram-form objective's rounding is ~1e-12).
            ours, reference = by_method["gradient"]["layer_objectives"], by_method["lbfgs"]["layer_objectives"]
            shared = [k for k in ours if not k.endswith(fuse_module.KV_SUFFIXES)]
            excess = {k: (ours[k][0] - reference[k][0]) / max(ours[k][1], 1e-30) for k in shared}
            above = [k for k, e in excess.items() if e > 1e-9]
            worst = max(excess, key=excess.get)
            print(f"n={n}: layers (text encoder and UNet without K/V) where gradient ends above the lbfgs reference: "
                  f"{len(above)} of {len(shared)} (largest difference {excess[worst]:.2e} of the layer's objective "
                  f"at W0, {worst})")
    loads = [r["load_average"] for r in rows]
    print(f"1-minute load average after the runs: {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} CPUs")
    for method in dict.fromkeys(r["method"] for r in rows):
        peaks = ", ".join(f"n={r['n']}: {'> ' if r['aborted'] else ''}{r['host_peak_gib']:.2f} (process "
                          f"{r['host_before_gib'] + r['host_peak_gib']:.2f})" for r in rows if r["method"] == method)
        print(f"host peak growth GiB of {method} by number of concepts (process peak RSS): {peaks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd15"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--concepts", default="1,3,6,14", help="comma-separated numbers of concepts")
    parser.add_argument("--methods", default="weight,lbfgs,gradient", help="any of weight, lbfgs, gradient, zip")
    parser.add_argument("--sampling-size", type=int, default=None, help="pixels (default: the model's: 32 / 512)")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                        help="dtype of the base model (statistics runs, saved folder); solves are float64 always")
    parser.add_argument("--lbfgs-text-iterations", type=int, default=PAPER_TEXT_ITERATIONS)
    parser.add_argument("--lbfgs-unet-iterations", type=int, default=PAPER_UNET_ITERATIONS)
    parser.add_argument("--rcond", type=float, default=None, help="the closed form's eigenvalue cutoff (default: "
                        "the config's)")
    parser.add_argument("--lbfgs-max-concepts", type=int, default=None,
                        help="run the lbfgs reference only up to this many concepts (it is the slow one)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (n, method); the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--host-limit-gib", type=float, default=None,
                        help="abort a run once the process RSS passes this (recorded as aborted, not measured)")
    parser.add_argument("--base-from-disk", action="store_true",
                        help="save the base once and let each fuse call load it (the CLI's path, CPU only): the "
                             "process then holds no extra copy of the model, and the host peak includes the load")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-concept, 1-step warm-up")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.base_from_disk and (args.device == "cuda" or args.dtype != "float32"):
        parser.error("--base-from-disk loads the base on the CPU in float32 (fuse's own loading); use it with "
                     "--device cpu --dtype float32")
    diffusers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.concepts.split(",")]
    source = source_state()
    methods = args.methods.split(",")

    def methods_for(n: int) -> list[str]:
        limit = args.lbfgs_max_concepts
        return [m for m in methods if m != "lbfgs" or limit is None or n <= limit]

    components = sd15_components() if args.model == "sd15" else tiny_components()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp:
        root = Path(tmp)
        paths = make_concepts(components, max(counts), root)  # on the CPU copy: the fingerprint is device-free
        base = f"random {args.model}"
        if args.base_from_disk:  # each fuse call loads the base itself, as the CLI does
            base = str(root / "base")
            StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).save_pretrained(base)
            components = None
        else:
            for key in ("unet", "vae", "text_encoder"):
                components[key].to(args.device, getattr(torch, args.dtype))
        if not args.no_warmup:
            measure(components, base, paths[:1], "gradient", args, root / "warmup", sampling_steps=1)
        for n in counts:
            runs: dict[str, list[dict]] = {m: [] for m in methods_for(n)}
            for _ in range(args.repeat):  # repeats interleave the methods, so each sees the same spells of load
                for method in methods_for(n):
                    r = measure(components, base, paths[:n], method, args, root / "fused")
                    runs[method].append(r)
                    print(f"  n={n} {method}: {r['seconds']:.1f} s, CPU {r['cpu_seconds']:.1f} s (solve "
                          f"{r['solve_seconds']:.2f} s), host peak +{r['host_peak_gib']:.2f} GiB, objective "
                          f"{r['totals'].get('objective_fused')}, load {r['load_average']:.2f}",
                          file=sys.stderr, flush=True)
            for method in methods_for(n):
                aborted = [r for r in runs[method] if r["aborted"]]
                best = aborted[0] if aborted else min(runs[method], key=lambda r: r["seconds"])
                rows.append({**best, "host_peak_gib": max(r["host_peak_gib"] for r in runs[method]),
                             "all_seconds": [r["seconds"] for r in runs[method]]})
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                               "source": source, "rows": rows},
                                              indent=1))
    print_table(rows, args, source)


if __name__ == "__main__":
    main()
