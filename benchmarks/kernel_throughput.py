"""GPU part of the label benchmark: Triton token targets and the fused loss, in one run, as ratios.

On one device and the same inputs (B=128, K=1000, 18x18 top-5 maps, 14x14 grid, crop + flip +
MixToken, smoothing 0.1 by default):

* targets: the public path (per-sample dense scatter + two ``torchvision.ops.roi_align`` + softmax),
  the PyTorch reference ops, and the Triton kernel (float32 and bfloat16 rows);
* the memory floor of the targets: compressed maps read + targets written, over the copy bandwidth
  measured here (a device-to-device ``copy_`` of 256 MiB);
* loss forward + backward on bfloat16 logits ``[B, K]`` + ``[B, 196, K]``: the fused Triton loss
  against plain ``F.cross_entropy`` with hard labels on the same logits, and against materialized
  targets + the soft-target loss;
* correctness on the same inputs: max |Triton - reference| of the targets, relative error of the
  fused loss value and gradients.

Times are ``triton.testing.do_bench`` medians (20th / 80th percentiles alongside). SPEC section 5
targets: targets >= 50x the public path and <= 2x the floor; fused loss <= 1.3x cross-entropy.

    python benchmarks/kernel_throughput.py                     # CUDA
    python benchmarks/kernel_throughput.py --sweep             # + every launch shape (tuning)
    python benchmarks/kernel_throughput.py --device cpu --small  # interpreter smoke run of the same code
    python benchmarks/label_throughput.py --device cuda        # the same, via the label benchmark
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if "--device" in sys.argv and "cpu" in sys.argv and __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors, before any kernel import

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import crop_flip_plan, machine_name, mix_box, smooth_topk_maps, time_cpu  # noqa: E402

from tl_fast import ops  # noqa: E402
from tl_fast.ops import reference  # noqa: E402
from tl_fast.ops.public import public_token_targets  # noqa: E402

PUBLIC_SPEEDUP_TARGET = 50.0
FLOOR_RATIO_TARGET = 2.0
LOSS_RATIO_TARGET = 1.3


def _timer(device: str, repeats: int) -> Callable[[Callable[[], object]], dict]:
    """Median and 20th/80th percentiles in seconds: do_bench on CUDA, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        def bench(fn):
            med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats),
                                                    quantiles=[0.5, 0.2, 0.8])
            return {"median": med / 1e3, "p20": p20 / 1e3, "p80": p80 / 1e3}
        return bench
    return lambda fn: time_cpu(fn, repeats=repeats)


def copy_bandwidth(device: str, bench, nbytes: int = 256 << 20) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))["median"]
    return 2 * nbytes / t


def run(args) -> dict:
    """Run the GPU benchmark for ``args`` (batch_size, num_classes, topk, map_size, grid, smoothing,
    repeats; optional device); print a table; return the figures."""
    device = getattr(args, "device", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernel_throughput: no CUDA device; use --device cpu --small for a smoke run")
    bench = _timer(device, args.repeats)
    bsz, num_classes, grid = args.batch_size, args.num_classes, (args.grid, args.grid)
    tokens = grid[0] * grid[1]
    values, indices = smooth_topk_maps(bsz, num_classes, args.topk, args.map_size)
    plan = crop_flip_plan(bsz)
    box = mix_box(grid)
    values, indices = values.to(device), indices.to(device)
    affine = plan.affine_tensor(device=device, dtype=torch.float32)
    boxes = torch.from_numpy(plan.box).to(device)
    flip = torch.from_numpy(plan.flip).to(device)
    kw = dict(num_classes=num_classes, grid=grid, smoothing=args.smoothing, mix_box=box)

    def public():
        return public_token_targets(values, indices, boxes, flip, **kw)

    def torch_ops():
        return reference.token_targets(values, indices, affine, **kw)

    def triton_f32():
        return ops.token_targets(values, indices, affine, impl="triton", **kw)

    def triton_bf16():
        return ops.token_targets(values, indices, affine, impl="triton", out_dtype=torch.bfloat16, **kw)

    # Correctness on these inputs first (also warms up / compiles every kernel variant).
    want = torch_ops()
    err_f32 = (triton_f32() - want).abs().max().item()
    err_bf16 = (triton_bf16().float() - want).abs().max().item()
    err_public = (public() - want).abs().max().item()

    res: dict = {"machine": machine_name(device), "device": device}
    times = {"public": bench(public), "torch_ops": bench(torch_ops), "triton_f32": bench(triton_f32),
             "triton_bf16": bench(triton_bf16)}

    bw = copy_bandwidth(device, bench, (256 << 20) if device == "cuda" else (16 << 20))
    read = values.numel() * values.element_size() + indices.numel() * indices.element_size() + affine.numel() * 4
    floor_f32 = (read + bsz * (1 + tokens) * num_classes * 4) / bw
    floor_bf16 = (read + bsz * (1 + tokens) * num_classes * 2) / bw

    # Loss forward + backward on bf16 logits (what mixed-precision training hands the loss).
    gen = torch.Generator().manual_seed(0)
    cls = (torch.randn(bsz, num_classes, generator=gen) * 2).to(device, torch.bfloat16).requires_grad_()
    tok = (torch.randn(bsz, tokens, num_classes, generator=gen) * 2).to(device, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, num_classes, (bsz,), generator=gen).to(device)
    tok_labels = labels.repeat_interleave(tokens)

    def fused():
        loss = ops.token_label_loss(cls, tok, maps=(values, indices), affine=affine, impl="triton", **kw)
        return torch.autograd.grad(loss, (cls, tok))

    def plain_ce():
        loss = F.cross_entropy(cls, labels) + F.cross_entropy(tok.flatten(0, 1), tok_labels)
        return torch.autograd.grad(loss, (cls, tok))

    def materialized():
        t = ops.token_targets(values, indices, affine, impl="triton", **kw)
        loss = reference.token_label_loss(cls, tok, t)
        return torch.autograd.grad(loss, (cls, tok))

    loss_fused = ops.token_label_loss(cls, tok, maps=(values, indices), affine=affine, impl="triton", **kw)
    g_fused = torch.autograd.grad(loss_fused, (cls, tok))
    c32, t32 = cls.detach().float().requires_grad_(), tok.detach().float().requires_grad_()
    loss_ref = reference.token_label_loss(c32, t32, want)
    g_ref = torch.autograd.grad(loss_ref, (c32, t32))
    loss_rel = abs(loss_fused.item() - loss_ref.item()) / abs(loss_ref.item())
    grad_rel = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(g_fused, g_ref))
    times.update({"loss_fused": bench(fused), "loss_plain_ce": bench(plain_ce), "loss_materialized": bench(materialized)})

    res.update({
        "times_s": times, "copy_bandwidth_GBps": bw / 1e9, "floor_s": {"f32": floor_f32, "bf16": floor_bf16},
        "targets_max_abs_err": {"triton_f32": err_f32, "triton_bf16": err_bf16, "public": err_public},
        "loss_rel_err": loss_rel, "grad_rel_err_bf16": grad_rel,
        "speedup_vs_public": times["public"]["median"] / times["triton_f32"]["median"],
        "floor_ratio_f32": times["triton_f32"]["median"] / floor_f32,
        "floor_ratio_bf16": times["triton_bf16"]["median"] / floor_bf16,
        "loss_ratio_vs_ce": times["loss_fused"]["median"] / times["loss_plain_ce"]["median"],
    })
    res["meets"] = {
        "targets_vs_public": res["speedup_vs_public"] >= PUBLIC_SPEEDUP_TARGET,
        "targets_vs_floor": res["floor_ratio_f32"] <= FLOOR_RATIO_TARGET,
        "loss_vs_ce": res["loss_ratio_vs_ce"] <= LOSS_RATIO_TARGET,
    }
    if getattr(args, "sweep", False):
        res["sweep"] = sweep_launch_shapes(bench, triton_f32, fused, floor_f32, times["loss_plain_ce"]["median"])
    _print(res, args)
    return res


def sweep_launch_shapes(bench, targets_fn, loss_fn, floor: float, ce: float) -> list[dict]:
    """Time the Triton targets and fused loss for each launch shape (warps x programs per SM); the
    results do not depend on it. Prints one line per shape; restores the defaults afterwards."""
    from tl_fast.kernels import token_targets as tt

    default = (tt.NUM_WARPS, tt.PROGRAMS_PER_SM)
    out = []
    try:
        for warps in (1, 2, 4, 8):
            for per_sm in (2, 4, 8, 16, 32):
                if warps * per_sm > 64:  # an SM holds at most 64 warps
                    continue
                tt.NUM_WARPS, tt.PROGRAMS_PER_SM = warps, per_sm
                t = bench(targets_fn)["median"]
                loss = bench(loss_fn)["median"]
                out.append({"warps": warps, "programs_per_sm": per_sm, "targets_s": t, "loss_s": loss})
                print(f"  sweep: warps {warps} programs/SM {per_sm:>2}: targets {t * 1e3:.3f} ms "
                      f"({t / floor:.2f}x floor), fused loss {loss * 1e3:.3f} ms ({loss / ce:.2f}x CE)")
    finally:
        tt.NUM_WARPS, tt.PROGRAMS_PER_SM = default
    return out


def _print(res: dict, args) -> None:
    t = res["times_s"]
    print(f"\nToken labeling kernels — {res['machine']} ({res['device']})")
    print(f"B={args.batch_size} K={args.num_classes} maps {args.map_size}x{args.map_size} top-{args.topk} grid "
          f"{args.grid}x{args.grid}, crop+flip+MixToken, smoothing {args.smoothing}; medians (p20-p80)")
    print(f"{'what':<44}{'ms':>9}{'p20-p80 ms':>18}{'ratio':>12}")
    pub = t["public"]["median"]
    rows = [
        ("targets: public (scatter + 2x roi_align)", "public", f"{1.0:.1f}x"),
        ("targets: tl_fast torch ops", "torch_ops", f"{pub / t['torch_ops']['median']:.1f}x"),
        ("targets: Triton float32", "triton_f32", f"{pub / t['triton_f32']['median']:.1f}x"),
        ("targets: Triton bfloat16", "triton_bf16", f"{pub / t['triton_bf16']['median']:.1f}x"),
        ("loss fwd+bwd: F.cross_entropy (hard)", "loss_plain_ce", "1.00x CE"),
        ("loss fwd+bwd: fused Triton", "loss_fused", f"{res['loss_ratio_vs_ce']:.2f}x CE"),
        ("loss fwd+bwd: targets + soft CE", "loss_materialized",
         f"{t['loss_materialized']['median'] / t['loss_plain_ce']['median']:.2f}x CE"),
    ]
    for name, key, ratio in rows:
        x = t[key]
        print(f"{name:<44}{x['median'] * 1e3:>9.3f}{x['p20'] * 1e3:>9.3f}-{x['p80'] * 1e3:<8.3f}{ratio:>12}")
    fl = res["floor_s"]
    print(f"copy bandwidth {res['copy_bandwidth_GBps']:.0f} GB/s; memory floor f32 {fl['f32'] * 1e3:.3f} ms "
          f"(Triton {res['floor_ratio_f32']:.2f}x), bf16 {fl['bf16'] * 1e3:.3f} ms (Triton {res['floor_ratio_bf16']:.2f}x)")
    e = res["targets_max_abs_err"]
    print(f"max |Triton - reference|: f32 {e['triton_f32']:.1e}, bf16 {e['triton_bf16']:.1e} (public path "
          f"{e['public']:.1e}); fused loss rel err {res['loss_rel_err']:.1e}, bf16 grads {res['grad_rel_err_bf16']:.1e}")
    m = res["meets"]
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    print(f"targets >= {PUBLIC_SPEEDUP_TARGET:.0f}x public: {ok(m['targets_vs_public'])} "
          f"({res['speedup_vs_public']:.1f}x); <= {FLOOR_RATIO_TARGET:.0f}x floor: {ok(m['targets_vs_floor'])}; "
          f"fused loss <= {LOSS_RATIO_TARGET}x CE: {ok(m['loss_vs_ce'])}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke run, e.g. on CPU)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--map-size", type=int, default=18)
    parser.add_argument("--grid", type=int, default=14)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--sweep", action="store_true",
                        help="also time every launch shape (TL_FAST_KERNEL_WARPS x TL_FAST_PROGRAMS_PER_SM)")
    args = parser.parse_args(argv)
    if args.small:
        args.batch_size, args.num_classes, args.map_size, args.grid, args.repeats = 4, 50, 7, 3, 2
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=float)
    return res


if __name__ == "__main__":
    main()
