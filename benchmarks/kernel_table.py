"""One table from ``python -m benchmarks.kernel_throughput --json`` (what ``gpu_check.sh`` prints).

    python -m benchmarks.kernel_table kernels_gpu.json

Exits 1 when the kernels disagree with the reference (targets f32 max error > 1e-5, bf16 > 4e-3,
fused loss relative error > 1e-4); the speed targets are printed as met / NOT met, never asserted.
"""
from __future__ import annotations

import json
import sys


def rows(r: dict) -> list[tuple[str, str, str]]:
    t = r["times_s"]
    ms = lambda key: t[key]["median"] * 1e3  # noqa: E731
    ce = ms("loss_plain_ce")
    out = [
        ("device", r["machine"], ""),
        ("write / copy bandwidth", f"{r['write_bandwidth_GBps']:.0f} / {r['copy_bandwidth_GBps']:.0f} GB/s", ""),
        ("floor f32 / bf16 (maps + targets / write bw)", f"{r['floor_s']['f32'] * 1e3:.4f} / "
         f"{r['floor_s']['bf16'] * 1e3:.4f} ms", ""),
        ("targets f32: time, vs floor", f"{ms('triton_f32'):.4f} ms  {r['floor_ratio_f32']:.2f}x", "<= 1.5x"),
        ("targets bf16: time, vs floor", f"{ms('triton_bf16'):.4f} ms  {r['floor_ratio_bf16']:.2f}x", "<= 1.5x"),
        ("targets f32 / bf16 vs public path", f"{r['speedup_vs_public']:.0f}x / "
         f"{r.get('speedup_vs_public_bf16', float('nan')):.0f}x", ">= 150x"),
        ("  stages: class rows / token rows", f"{ms('stage_class_rows'):.4f} / {ms('stage_token_rows'):.4f} ms", ""),
        ("fused loss fwd+bwd vs F.cross_entropy", f"{ms('loss_fused'):.4f} / {ce:.4f} ms  "
         f"{r['loss_ratio_vs_ce']:.2f}x", "<= 1.0x"),
    ]
    if "loss_ratio_vs_ce_graph" in r:
        out.append(("  in a CUDA graph", f"{ms('loss_fused_graph'):.4f} / {ms('loss_plain_ce_graph'):.4f} ms  "
                    f"{r['loss_ratio_vs_ce_graph']:.2f}x", "<= 1.0x"))
    out.append(("  stages: fused forward / backward", f"{ms('stage_loss_fwd'):.4f} / {ms('stage_loss_bwd'):.4f} ms",
                ""))
    e = r["targets_max_abs_err"]
    out.append(("max err: targets f32 / bf16", f"{e['triton_f32']:.1e} / {e['triton_bf16']:.1e}", "1e-5 / 4e-3"))
    out.append(("max err: loss rel / bf16 grads rel", f"{r['loss_rel_err']:.1e} / {r['grad_rel_err_bf16']:.1e}",
                "1e-4 / -"))
    for k in r.get("kernels", []):
        out.append((f"  {k['kernel']} ({k['warps']} warps)", f"{k['registers']} regs, {k['spills']} spills", ""))
    for s in r.get("sweep", []):
        out.append((f"  sweep tile {s['tile']} warps {s['warps']}", f"targets {s['targets_s'] * 1e3:.4f} ms, "
                    f"loss {s['loss_s'] * 1e3:.4f} ms", ""))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    r = json.load(open(argv[0]))
    r = r.get("gpu", r)  # benchmarks.label_throughput nests the same figures under "gpu"
    for name, value, target in rows(r):
        print(f"{name:<46}{value:>36}  {target}")
    e = r["targets_max_abs_err"]
    ok = e["triton_f32"] <= 1e-5 and e["triton_bf16"] <= 4e-3 and r["loss_rel_err"] <= 1e-4
    if not ok:
        print("kernel errors above bounds")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
