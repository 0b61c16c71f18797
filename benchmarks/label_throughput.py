"""Token-target throughput: the public path against tl_fast, in one run, as ratios.

CPU (always): the public path (per-sample dense scatter, two torchvision RoI-Aligns, softmax,
smoothing, MixToken) against tl_fast's two CPU implementations — the numba path
``tl_fast.ops.cpu.token_targets`` (what ``impl="auto"`` runs on CPU tensors) and the PyTorch reference
``tl_fast.ops.reference.token_targets`` (``impl="torch"``) — on B=128, K=1000, 18x18 top-5 maps, a
14x14 grid, crop + flip + MixToken. The three run interleaved, one call each per round, and the
table gives medians, at each ``--threads`` count and each ``--load`` level (busy-loop processes run
beside them, to stand for a loaded host). Then the label store's batched gather against one
``torch.load`` per sample (``benchmarks.store_throughput``). "CPU ms" is the CPU time the process
used per call, all threads together (OpenMP spin-waiting counts): on a shared host it shows the work
apart from the waiting.

GPU (``--device cuda``): the same public path on the GPU against the Triton kernels and the fused
loss (``benchmarks.kernel_throughput``).

    python -m benchmarks.label_throughput --skip-store                  # CPU, 1 and 2 threads, quiet
    python -m benchmarks.label_throughput --skip-store --load 0 1       # ... also beside one busy loop
    python -m benchmarks.label_throughput --device cuda   # GPU part (benchmarks/gpu_check.sh runs it)

Rows: the CPU path and the reference against the public path, per configuration
(``benchmarks/results/label_throughput.json``); the store's and the kernels' rows go to their own
benchmarks' files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks import harness, kernel_throughput, store_throughput
from benchmarks.baselines import public_token_targets
from benchmarks.common import crop_flip_plan, mix_box, smooth_topk_maps
from tl_fast.ops import cpu, reference

CPU_TARGET = 8.0  # docs/spec.md section 5 / issue 14: the CPU path >= 8x the public path, also on a loaded host
PATHS = (("public", "public (scatter + 2x roi_align)"), ("reference", "tl_fast reference (torch)"),
         ("cpu", "tl_fast cpu (numba, auto)"))
_BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_load(procs: int, seconds: float):
    """``procs`` busy-loop processes (one core each) for the duration of the block; each also exits by
    itself after ``seconds``, so a killed benchmark leaves no load behind for long."""
    running = [subprocess.Popen([sys.executable, "-c", _BUSY_LOOP.format(seconds=seconds)]) for _ in range(procs)]
    try:
        if running:
            time.sleep(0.5)  # let them start spinning
        yield
    finally:
        for p in running:
            p.terminate()
        for p in running:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def cpu_targets(args, threads: int, load: int) -> dict:
    """One configuration: ``threads`` torch (and CPU-path) threads, ``load`` busy loops beside."""
    values, indices = smooth_topk_maps(args.batch_size, args.num_classes, args.topk, args.map_size)
    plan = crop_flip_plan(args.batch_size)
    grid = (args.grid, args.grid)
    box = mix_box(grid)
    affine = plan.affine_tensor(dtype=torch.float64)
    boxes, flip = torch.from_numpy(plan.box), torch.from_numpy(plan.flip)
    kw = dict(num_classes=args.num_classes, grid=grid, smoothing=args.smoothing, mix_box=box)
    fns = {
        "public": lambda: public_token_targets(values, indices, boxes, flip, **kw),
        "reference": lambda: reference.token_targets(values, indices, affine, **kw),
        "cpu": lambda: cpu.token_targets(values, indices, affine, **kw),
    }
    torch.set_num_threads(threads)
    public = fns["public"]()
    err = {name: (public - fns[name]()).abs().max().item() for name in ("reference", "cpu")}
    del public
    with busy_load(load, args.load_seconds):
        load_avg = os.getloadavg()[0]
        timed = harness.interleaved(fns, args.repeats)
    t = {name: {**x.stats(), "all": x.seconds, "cpu_median": harness.spread(x.cpu_seconds)["median"]}
         for name, x in timed.items()}
    speedup = {name: t["public"]["median"] / t[name]["median"] for name in ("reference", "cpu")}
    return {"threads": threads, "load_procs": load, "load_average": load_avg, "times_s": t, "speedup": speedup,
            "max_abs_diff_vs_public": err, "meets_target": speedup["cpu"] >= CPU_TARGET}


def print_cpu_table(args, runs: list[dict]) -> None:
    print(f"\nToken targets on CPU — {harness.machine_name('cpu')}")
    print(f"B={args.batch_size} K={args.num_classes} maps {args.map_size}x{args.map_size} top-{args.topk} "
          f"grid {args.grid}x{args.grid}, crop+flip+MixToken, smoothing {args.smoothing}; interleaved, "
          f"median of {args.repeats} (p20-p80); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{'threads':>7}{'busy':>5}{'loadavg':>8}  {'path':<32}{'ms':>9}{'p20-p80 ms':>18}{'vs public':>11}"
          f"{'CPU ms':>9}")
    for r in runs:
        for key, name in PATHS:
            t = r["times_s"][key]
            ratio = r["times_s"]["public"]["median"] / t["median"]
            print(f"{r['threads']:>7}{r['load_procs']:>5}{r['load_average']:>8.1f}  {name:<32}{t['median'] * 1e3:>9.1f}"
                  f"{t['p20'] * 1e3:>9.1f}-{t['p80'] * 1e3:<8.1f}{ratio:>10.2f}x{t['cpu_median'] * 1e3:>9.1f}")
    worst = min(r["speedup"]["cpu"] for r in runs)
    diff = max(max(r["max_abs_diff_vs_public"].values()) for r in runs)
    print(f"cpu path, lowest ratio {worst:.2f}x: target >= {CPU_TARGET:.0f}x "
          f"{'met' if worst >= CPU_TARGET else 'NOT met'}; max |difference| to the public path {diff:.2e}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="which part to run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--map-size", type=int, default=18, help="H = W of the label maps")
    parser.add_argument("--grid", type=int, default=14, help="token grid side (224 px / patch 16)")
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per configuration")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch CPU thread counts to measure, one configuration each (default: 1 2)")
    parser.add_argument("--load", type=int, nargs="+", default=[0],
                        help="busy-loop processes to run beside the timed code, one configuration per value "
                             "(e.g. --load 0 1: quiet, then beside one busy core)")
    parser.add_argument("--load-seconds", type=float, default=900.0,
                        help="a busy loop stops by itself after this long, even if the benchmark is killed")
    parser.add_argument("--skip-store", action="store_true", help="skip the label-store gather benchmark")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    harness.add_record_arguments(parser)
    args = parser.parse_args(argv)

    results: dict = {"machine": harness.machine_name(args.device), "args": vars(args)}
    record = ["--results-dir", args.results_dir] + (["--no-record"] if args.no_record else [])
    if args.device == "cuda":
        torch.set_num_threads(args.threads[0])
        results["gpu"] = kernel_throughput.run(args)
        harness.record("kernel_throughput", kernel_throughput.rows(results["gpu"], args), args, argv, device="cuda",
                       module="benchmarks.label_throughput")
    else:
        runs = [cpu_targets(args, threads, load) for load in args.load for threads in args.threads]
        results["cpu_targets"] = runs
        print_cpu_table(args, runs)
        harness.record("label_throughput", rows(args, runs), args, argv)
        if not args.skip_store:
            torch.set_num_threads(1)
            results["store"] = store_throughput.main(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return results


def rows(args, runs: list[dict]) -> list[dict]:
    """One row per CPU implementation and configuration, against the public path of the same run."""
    sizes = (f"B={args.batch_size} K={args.num_classes} {args.map_size}x{args.map_size} top-{args.topk} "
             f"grid {args.grid}x{args.grid}, crop+flip+MixToken")
    out = []
    for r in runs:
        config = f"{sizes}; {r['threads']} torch thread(s), {r['load_procs']} busy loop(s) beside"
        pub = r["times_s"]["public"]
        for key, what in (("cpu", "numba CPU path (impl='auto')"), ("reference", "PyTorch reference (impl='torch')")):
            t = r["times_s"][key]
            cpu_target = key == "cpu"
            out.append(harness.row(
                f"token targets, {what}", config, 1e3 * t["median"], "ms", target="cpu-token-targets",
                spread_of={"p20": 1e3 * t["p20"], "p80": 1e3 * t["p80"]},
                baseline="public path (scatter + 2x roi_align)", baseline_value=1e3 * pub["median"],
                ratio=r["speedup"][key], ratio_of="baseline / value",
                goal=f">= {CPU_TARGET:.0f}x" if cpu_target else None, meets=r["speedup"][key] >= CPU_TARGET,
                cpu_ms=1e3 * t["cpu_median"], public_cpu_ms=1e3 * pub["cpu_median"],
                load_average=round(r["load_average"], 1), max_abs_diff=r["max_abs_diff_vs_public"][key]))
    return out


if __name__ == "__main__":
    main()
