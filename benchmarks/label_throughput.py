"""Token-target throughput: the public path against tl_fast, in one run, as ratios.

CPU (always): the public path (per-sample dense scatter, two torchvision RoI-Aligns, softmax,
smoothing, MixToken) against ``tl_fast.ops.reference.token_targets`` (what ``impl="torch"`` runs) on B=128, K=1000, 18x18
top-5 maps, a 14x14 grid, crop + flip + MixToken. Then the label store's batched gather against one
``torch.load`` per sample (``benchmarks/store_throughput.py``).

GPU (``--device cuda``): the same public path on the GPU against the Triton kernels and the fused
loss (``benchmarks/kernel_throughput.py``).

    python benchmarks/label_throughput.py                 # CPU part
    python benchmarks/label_throughput.py --device cuda   # GPU part (run by benchmarks/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import crop_flip_plan, machine_name, mix_box, smooth_topk_maps, time_cpu  # noqa: E402

from tl_fast.ops import reference  # noqa: E402
from tl_fast.ops.public import public_token_targets  # noqa: E402

CPU_TARGET = 8.0  # SPEC section 5: reference ops >= 8x the public path on CPU


def cpu_targets(args) -> dict:
    values, indices = smooth_topk_maps(args.batch_size, args.num_classes, args.topk, args.map_size)
    plan = crop_flip_plan(args.batch_size)
    grid = (args.grid, args.grid)
    box = mix_box(grid)
    affine = plan.affine_tensor(dtype=torch.float64)
    boxes, flip = torch.from_numpy(plan.box), torch.from_numpy(plan.flip)

    def public():
        return public_token_targets(values, indices, boxes, flip, num_classes=args.num_classes, grid=grid,
                                    smoothing=args.smoothing, mix_box=box)

    def ours():
        return reference.token_targets(values, indices, affine, num_classes=args.num_classes, grid=grid,
                                       smoothing=args.smoothing, mix_box=box)

    err = (public() - ours()).abs().max().item()
    t_public = time_cpu(public, args.repeats)
    t_ours = time_cpu(ours, args.repeats)
    speedup = t_public["median"] / t_ours["median"]
    return {"public_s": t_public, "tl_fast_s": t_ours, "speedup": speedup, "max_abs_diff": err,
            "meets_target": speedup >= CPU_TARGET}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="which part to run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--map-size", type=int, default=18, help="H = W of the label maps")
    parser.add_argument("--grid", type=int, default=14, help="token grid side (224 px / patch 16)")
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = one core, as in SPEC)")
    parser.add_argument("--skip-store", action="store_true", help="skip the label-store gather benchmark")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict = {"machine": machine_name(args.device), "args": vars(args)}
    if args.device == "cuda":
        kernel_bench = importlib.import_module("kernel_throughput")
        results["gpu"] = kernel_bench.run(args)
    else:
        r = cpu_targets(args)
        results["cpu_targets"] = r
        print(f"\nToken targets on CPU — {results['machine']}")
        print(f"B={args.batch_size} K={args.num_classes} maps {args.map_size}x{args.map_size} top-{args.topk} "
              f"grid {args.grid}x{args.grid}, crop+flip+MixToken, smoothing {args.smoothing}; "
              f"median of {args.repeats} (p20-p80)")
        print(f"{'path':<34}{'ms':>10}{'p20-p80 ms':>18}{'speedup':>10}")
        for name, key in (("public (scatter + 2x roi_align)", "public_s"), ("tl_fast.ops (torch)", "tl_fast_s")):
            t = r[key]
            print(f"{name:<34}{t['median'] * 1e3:>10.1f}{t['p20'] * 1e3:>9.1f}-{t['p80'] * 1e3:<8.1f}"
                  f"{r['public_s']['median'] / t['median']:>9.2f}x")
        print(f"target >= {CPU_TARGET:.0f}x: {'met' if r['meets_target'] else 'NOT met'}; "
              f"max |difference| {r['max_abs_diff']:.2e}")
        if not args.skip_store:
            store_bench = importlib.import_module("store_throughput")
            results["store"] = store_bench.main([])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return results


if __name__ == "__main__":
    main()
