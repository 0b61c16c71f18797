"""GPU part of the label benchmark: Triton token targets and the fused loss, in one run, as ratios.

On one device and the same inputs (B=128, K=1000, 18x18 top-5 maps, 14x14 grid, crop + flip +
MixToken, smoothing 0.1 by default):

* bandwidth measured here: a device-wide write (``fill_``) and a copy (``copy_``) of 256 MiB;
* the floors of the targets: compressed maps read + targets written, over the measured write
  bandwidth (f32 and bf16 rows);
* targets: the public path (per-sample dense scatter + two ``torchvision.ops.roi_align`` + softmax),
  the PyTorch reference ops and the Triton kernels (f32 and bf16 rows), with per-stage times (class
  rows; token rows);
* loss forward + backward on bf16 logits ``[B, K]`` + ``[B, 196, K]``: the fused Triton loss against
  plain ``F.cross_entropy`` with hard labels on the same logits, both plain and replayed from a CUDA
  graph (which removes host launch overhead), and per-stage times (forward, backward);
* correctness on the same inputs: max |Triton - reference| of the targets, relative error of the
  fused loss value and gradients;
* registers and spills of every compiled kernel (read from the loaded kernels);
* ``--sweep``: the targets and the loss for a few launch shapes (token rows per program x warps).

Times are ``triton.testing.do_bench`` medians (20th / 80th percentiles alongside).

    python -m benchmarks.kernel_throughput                       # CUDA
    python -m benchmarks.kernel_throughput --sweep --json r.json # + the launch sweep (gpu_check.sh)
    python -m benchmarks.kernel_throughput --device cpu --small  # interpreter smoke run of the same code
    python -m benchmarks.label_throughput --device cuda          # the same, via the label benchmark

Rows (on CUDA only; a CPU run is a smoke run): the targets against the memory floor and the public
path, the fused loss against ``F.cross_entropy`` (``benchmarks/results/kernel_throughput.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

if "--device" in sys.argv and "cpu" in sys.argv and __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU tensors, before any kernel import

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.baselines import public_token_targets  # noqa: E402
from benchmarks.common import crop_flip_plan, mix_box, smooth_topk_maps  # noqa: E402
from tl_fast.ops import reference  # noqa: E402

PUBLIC_SPEEDUP_TARGET = 150.0
FLOOR_RATIO_TARGET = 1.5
LOSS_RATIO_TARGET = 1.0
SWEEP = [(8, 4), (4, 4), (16, 4), (8, 8)]  # (token rows per program, warps); (8, 4) is the default


def _timer(device: str, repeats: int) -> Callable[[Callable[[], object]], dict]:
    """Median and 20th/80th percentiles in seconds: do_bench on CUDA, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        def bench(fn):
            med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=max(100, 20 * repeats),
                                                    quantiles=[0.5, 0.2, 0.8])
            return {"median": med / 1e3, "p20": p20 / 1e3, "p80": p80 / 1e3}
        return bench
    return lambda fn: harness.interleaved({"fn": fn}, repeats)["fn"].stats()


def bandwidth(device: str, bench, nbytes: int) -> tuple[float, float]:
    """(write, copy) bytes per second: a ``fill_`` of ``nbytes`` and a device-to-device copy
    (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    write = nbytes / bench(lambda: dst.fill_(1.0))["median"]
    copy = 2 * nbytes / bench(lambda: dst.copy_(src))["median"]
    return write, copy


def graph_replay(fn: Callable[[], object]) -> Callable[[], None] | None:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream), or None if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        print(f"  CUDA graph capture failed: {type(err).__name__}: {err}")
        return None


def kernel_registers() -> list[dict]:
    """Registers / spills of every kernel this process compiled and loaded (CUDA only)."""
    from tl_fast.kernels import token_label_loss as tll
    from tl_fast.kernels import token_targets as tt

    out = []
    for mod in (tt, tll):
        for name in dir(mod):
            fn = getattr(mod, name)
            caches = getattr(fn, "device_caches", None)
            if not name.endswith("_kernel") or not caches:
                continue
            for cache in caches.values():
                for kernel in cache[0].values():
                    try:
                        kernel._init_handles()
                    except Exception:  # noqa: BLE001 - a figure we cannot read is left out
                        continue
                    out.append({"kernel": name, "registers": kernel.n_regs, "spills": kernel.n_spills,
                                "warps": kernel.metadata.num_warps, "shared": kernel.metadata.shared})
    return out


def run(args) -> dict:
    """Run the GPU benchmark for ``args`` (batch_size, num_classes, topk, map_size, grid, smoothing,
    repeats; optional device, sweep); print a table; return the figures."""
    from tl_fast.kernels import token_label_loss as tll
    from tl_fast.kernels import token_targets as tt

    device = getattr(args, "device", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("kernel_throughput: no CUDA device; use --device cpu --small for a smoke run")
    cuda = device == "cuda"
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

    def targets(dtype=torch.float32, launch=tt.DEFAULT_LAUNCH):
        return lambda: tt.token_targets(values, indices, affine, out_dtype=dtype, launch=launch, **kw)

    # Correctness on these inputs first (also compiles every kernel variant).
    want = torch_ops()
    err_f32 = (targets()() - want).abs().max().item()
    err_bf16 = (targets(torch.bfloat16)().float() - want).abs().max().item()
    err_public = (public() - want).abs().max().item()

    res: dict = {"machine": harness.machine_name(device), "device": device}
    times = {"public": bench(public), "torch_ops": bench(torch_ops), "triton_f32": bench(targets()),
             "triton_bf16": bench(targets(torch.bfloat16))}

    # Per-stage: the class rows (memset + class kernel) and the token rows (tile + long-row kernels).
    mix = tt.mix_spec(box, bsz, values.device)
    out = torch.empty(bsz, 1 + tokens, num_classes, device=device)
    vec = tt.vector_width(num_classes, 4)
    times["stage_class_rows"] = bench(lambda: tt.launch_class_rows(
        values, indices, affine, mix, out, (1 + tokens) * num_classes, num_classes=num_classes, grid=grid,
        smoothing=args.smoothing, vec=vec))
    times["stage_token_rows"] = bench(lambda: tt.launch_token_rows(
        values, indices, affine, mix, out, num_classes=num_classes, grid=grid, smoothing=args.smoothing, vec=vec))

    write_bw, copy_bw = bandwidth(device, bench, (256 << 20) if cuda else (16 << 20))
    read = values.numel() * values.element_size() + indices.numel() * indices.element_size() + affine.numel() * 4
    floor_f32 = (read + bsz * (1 + tokens) * num_classes * 4) / write_bw
    floor_bf16 = (read + bsz * (1 + tokens) * num_classes * 2) / write_bw

    # Loss forward + backward on bf16 logits (what mixed-precision training hands the loss).
    gen = torch.Generator().manual_seed(0)
    cls = (torch.randn(bsz, num_classes, generator=gen) * 2).to(device, torch.bfloat16).requires_grad_()
    tok = (torch.randn(bsz, tokens, num_classes, generator=gen) * 2).to(device, torch.bfloat16).requires_grad_()
    labels = torch.randint(0, num_classes, (bsz,), generator=gen).to(device)
    tok_labels = labels.repeat_interleave(tokens)
    spec = tll.LossSpec(num_classes, grid, args.smoothing, 1.0, 1.0, mix)
    one = torch.ones((), device=device)

    def fused(launch=tt.DEFAULT_LAUNCH):
        def fn():
            loss = tll.token_label_loss(cls, tok, values, indices, affine, grid=grid, smoothing=args.smoothing,
                                        mix_box=box, launch=launch)
            return torch.autograd.grad(loss, (cls, tok))
        return fn

    def fused_direct():  # the same kernels without autograd (what a CUDA graph captures)
        loss, state = tll.forward(cls.detach(), tok.detach(), values, indices, affine, spec)
        return tll.backward(one, cls.detach(), tok.detach(), values, indices, affine, state, spec)

    def plain_ce():
        loss = F.cross_entropy(cls, labels) + F.cross_entropy(tok.flatten(0, 1), tok_labels)
        return torch.autograd.grad(loss, (cls, tok))

    def materialized():
        t = tt.token_targets(values, indices, affine, **kw)
        loss = reference.token_label_loss(cls, tok, t)
        return torch.autograd.grad(loss, (cls, tok))

    loss_fused = tll.token_label_loss(cls, tok, values, indices, affine, grid=grid, smoothing=args.smoothing,
                                      mix_box=box)
    g_fused = torch.autograd.grad(loss_fused, (cls, tok))
    c32, t32 = cls.detach().float().requires_grad_(), tok.detach().float().requires_grad_()
    loss_ref = reference.token_label_loss(c32, t32, want)
    g_ref = torch.autograd.grad(loss_ref, (c32, t32))
    loss_rel = abs(loss_fused.item() - loss_ref.item()) / abs(loss_ref.item())
    grad_rel = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(g_fused, g_ref))
    times.update({"loss_fused": bench(fused()), "loss_plain_ce": bench(plain_ce),
                  "loss_materialized": bench(materialized)})
    _, state = tll.forward(cls.detach(), tok.detach(), values, indices, affine, spec)
    times["stage_loss_fwd"] = bench(lambda: tll.forward(cls.detach(), tok.detach(), values, indices, affine, spec))
    times["stage_loss_bwd"] = bench(lambda: tll.backward(one, cls.detach(), tok.detach(), values, indices, affine,
                                                         state, spec))
    graphs = {}
    if cuda:
        for key, fn in (("loss_fused_graph", fused_direct), ("loss_plain_ce_graph", plain_ce)):
            replay = graph_replay(fn)
            if replay is not None:
                times[key] = bench(replay)
                graphs[key] = True

    res.update({
        "times_s": times, "write_bandwidth_GBps": write_bw / 1e9, "copy_bandwidth_GBps": copy_bw / 1e9,
        "floor_s": {"f32": floor_f32, "bf16": floor_bf16},
        "targets_max_abs_err": {"triton_f32": err_f32, "triton_bf16": err_bf16, "public": err_public},
        "loss_rel_err": loss_rel, "grad_rel_err_bf16": grad_rel,
        "speedup_vs_public": times["public"]["median"] / times["triton_f32"]["median"],
        "speedup_vs_public_bf16": times["public"]["median"] / times["triton_bf16"]["median"],
        "floor_ratio_f32": times["triton_f32"]["median"] / floor_f32,
        "floor_ratio_bf16": times["triton_bf16"]["median"] / floor_bf16,
        "loss_ratio_vs_ce": times["loss_fused"]["median"] / times["loss_plain_ce"]["median"],
    })
    if "loss_fused_graph" in times and "loss_plain_ce_graph" in times:
        res["loss_ratio_vs_ce_graph"] = times["loss_fused_graph"]["median"] / times["loss_plain_ce_graph"]["median"]
    res["meets"] = {
        "targets_vs_public": res["speedup_vs_public"] >= PUBLIC_SPEEDUP_TARGET,
        "targets_vs_floor": max(res["floor_ratio_f32"], res["floor_ratio_bf16"]) <= FLOOR_RATIO_TARGET,
        "loss_vs_ce": res["loss_ratio_vs_ce"] <= LOSS_RATIO_TARGET,
    }
    if cuda:
        res["kernels"] = kernel_registers()
    if getattr(args, "sweep", False):
        res["sweep"] = sweep_launch_shapes(bench, targets, fused, floor_f32, times["loss_plain_ce"]["median"])
    _print(res, args)
    return res


def sweep_launch_shapes(bench, targets, fused, floor: float, ce: float) -> list[dict]:
    """Time the Triton targets (f32) and fused loss for each launch shape; results never depend on it."""
    from tl_fast.kernels import token_targets as tt

    out = []
    for tile, warps in SWEEP:
        launch = tt.Launch(tile=tile, warps=warps)
        t = bench(targets(torch.float32, launch))["median"]
        loss = bench(fused(launch))["median"]
        out.append({"tile": tile, "warps": warps, "targets_s": t, "loss_s": loss})
        print(f"  sweep: tile {tile:>2} warps {warps}: targets {t * 1e3:.3f} ms ({t / floor:.2f}x floor), "
              f"fused loss {loss * 1e3:.3f} ms ({loss / ce:.2f}x CE)")
    return out


def _print(res: dict, args) -> None:
    t = res["times_s"]
    ms = lambda key: f"{t[key]['median'] * 1e3:.3f}" if key in t else "n/a"  # noqa: E731
    print(f"\nToken labeling kernels — {res['machine']} ({res['device']})")
    print(f"B={args.batch_size} K={args.num_classes} maps {args.map_size}x{args.map_size} top-{args.topk} grid "
          f"{args.grid}x{args.grid}, crop+flip+MixToken, smoothing {args.smoothing}; medians (p20-p80)")
    print(f"{'what':<46}{'ms':>9}{'p20-p80 ms':>18}{'ratio':>16}")
    pub = t["public"]["median"]
    ce = t["loss_plain_ce"]["median"]
    fl = res["floor_s"]
    rows = [
        ("targets: public (scatter + 2x roi_align)", "public", "1.0x public"),
        ("targets: tl_fast torch ops", "torch_ops", f"{pub / t['torch_ops']['median']:.1f}x public"),
        ("targets: Triton f32", "triton_f32", f"{res['floor_ratio_f32']:.2f}x floor"),
        ("targets: Triton bf16", "triton_bf16", f"{res['floor_ratio_bf16']:.2f}x floor"),
        ("  stage: class rows (memset + class kernel)", "stage_class_rows", ""),
        ("  stage: token rows (tile + long-row kernels)", "stage_token_rows", ""),
        ("loss fwd+bwd: F.cross_entropy (hard)", "loss_plain_ce", "1.00x CE"),
        ("loss fwd+bwd: fused Triton", "loss_fused", f"{res['loss_ratio_vs_ce']:.2f}x CE"),
        ("  stage: fused forward", "stage_loss_fwd", f"{t['stage_loss_fwd']['median'] / ce:.2f}x CE"),
        ("  stage: fused backward", "stage_loss_bwd", f"{t['stage_loss_bwd']['median'] / ce:.2f}x CE"),
        ("loss fwd+bwd: targets + soft CE", "loss_materialized", f"{t['loss_materialized']['median'] / ce:.2f}x CE"),
    ]
    if "loss_plain_ce_graph" in t:
        rows.append(("loss fwd+bwd: F.cross_entropy, CUDA graph", "loss_plain_ce_graph", "1.00x CE graph"))
    if "loss_fused_graph" in t:
        ratio = f"{res['loss_ratio_vs_ce_graph']:.2f}x CE graph" if "loss_ratio_vs_ce_graph" in res else ""
        rows.append(("loss fwd+bwd: fused Triton, CUDA graph", "loss_fused_graph", ratio))
    for name, key, ratio in rows:
        x = t[key]
        print(f"{name:<46}{x['median'] * 1e3:>9.3f}{x['p20'] * 1e3:>9.3f}-{x['p80'] * 1e3:<8.3f}{ratio:>16}")
    print(f"bandwidth: write {res['write_bandwidth_GBps']:.0f} GB/s, copy {res['copy_bandwidth_GBps']:.0f} GB/s; "
          f"floors (maps read + targets written over write bandwidth): f32 {fl['f32'] * 1e3:.4f} ms, "
          f"bf16 {fl['bf16'] * 1e3:.4f} ms")
    print(f"Triton vs public: f32 {res['speedup_vs_public']:.1f}x, bf16 {res['speedup_vs_public_bf16']:.1f}x "
          f"(public {ms('public')} ms)")
    e = res["targets_max_abs_err"]
    print(f"max |Triton - reference|: f32 {e['triton_f32']:.1e}, bf16 {e['triton_bf16']:.1e} (public path "
          f"{e['public']:.1e}); fused loss rel err {res['loss_rel_err']:.1e}, "
          f"bf16 grads {res['grad_rel_err_bf16']:.1e}")
    for k in res.get("kernels", []):
        print(f"  kernel {k['kernel']:<24} warps {k['warps']} registers {k['registers']:>3} spills {k['spills']} "
              f"shared {k['shared']} B")
    m = res["meets"]
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    print(f"targets >= {PUBLIC_SPEEDUP_TARGET:.0f}x public: {ok(m['targets_vs_public'])}; <= {FLOOR_RATIO_TARGET}x "
          f"floor (f32 and bf16): {ok(m['targets_vs_floor'])}; fused loss <= {LOSS_RATIO_TARGET}x CE: "
          f"{ok(m['loss_vs_ce'])}")


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
    parser.add_argument("--sweep", action="store_true", help=f"also time the launch shapes (tile, warps) {SWEEP}")
    harness.add_record_arguments(parser)
    args = parser.parse_args(argv)
    if args.small:
        args.batch_size, args.num_classes, args.map_size, args.grid, args.repeats = 4, 50, 7, 3, 2
    res = run(args)
    if res["device"] == "cuda":
        harness.record("kernel_throughput", rows(res, args), args, argv, device="cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=float)
        picture(res, os.path.splitext(args.json)[0] + ".png")
    return res


def rows(res: dict, args) -> list[dict]:
    """The targets against the memory floor and the public path; the fused loss against hard-label CE."""
    t = res["times_s"]
    config = (f"B={args.batch_size} K={args.num_classes} {args.map_size}x{args.map_size} top-{args.topk} "
              f"grid {args.grid}x{args.grid}, crop+flip+MixToken, smoothing {args.smoothing}")
    ms = lambda key: 1e3 * t[key]["median"]  # noqa: E731
    spread = lambda key: {q: 1e3 * t[key][q] for q in ("p20", "p80")}  # noqa: E731
    out = []
    for dtype in ("f32", "bf16"):
        key, floor = f"triton_{dtype}", 1e3 * res["floor_s"][dtype]
        ratio = res[f"floor_ratio_{dtype}"]
        out.append(harness.row(f"Triton token targets, {dtype} output, vs the memory floor", config, ms(key), "ms",
                               target="gpu-token-targets", spread_of=spread(key),
                               baseline="memory floor (maps read + targets written, over the measured write "
                                        "bandwidth)", baseline_value=floor, ratio=ratio, ratio_of="value / baseline",
                               goal=f"<= {FLOOR_RATIO_TARGET}x", meets=ratio <= FLOOR_RATIO_TARGET,
                               write_bandwidth_GBps=res["write_bandwidth_GBps"]))
        speedup = res["speedup_vs_public" + ("" if dtype == "f32" else "_bf16")]
        out.append(harness.row(f"Triton token targets, {dtype} output, vs the public path", config, ms(key), "ms",
                               target="gpu-token-targets", spread_of=spread(key),
                               baseline="public path (scatter + 2x roi_align) on the same GPU",
                               baseline_value=ms("public"), ratio=speedup, ratio_of="baseline / value",
                               goal=f">= {PUBLIC_SPEEDUP_TARGET:.0f}x", meets=speedup >= PUBLIC_SPEEDUP_TARGET,
                               max_abs_err=res["targets_max_abs_err"][key]))
    out.append(harness.row("fused token-label loss, forward + backward, bf16 logits", config, ms("loss_fused"), "ms",
                           target="gpu-fused-loss", spread_of=spread("loss_fused"),
                           baseline="F.cross_entropy with hard labels, forward + backward",
                           baseline_value=ms("loss_plain_ce"), ratio=res["loss_ratio_vs_ce"],
                           ratio_of="value / baseline",
                           goal=f"<= {LOSS_RATIO_TARGET}x", meets=res["loss_ratio_vs_ce"] <= LOSS_RATIO_TARGET,
                           loss_rel_err=res["loss_rel_err"], grad_rel_err_bf16=res["grad_rel_err_bf16"]))
    if "loss_ratio_vs_ce_graph" in res:
        ratio = res["loss_ratio_vs_ce_graph"]
        out.append(harness.row("fused token-label loss, forward + backward, in a CUDA graph", config,
                               ms("loss_fused_graph"), "ms", target="gpu-fused-loss",
                               spread_of=spread("loss_fused_graph"),
                               baseline="F.cross_entropy with hard labels, in a CUDA graph",
                               baseline_value=ms("loss_plain_ce_graph"), ratio=ratio, ratio_of="value / baseline",
                               goal=f"<= {LOSS_RATIO_TARGET}x", meets=ratio <= LOSS_RATIO_TARGET))
    return out


def picture(res: dict, path: str) -> None:
    """Kernel times against the targets' write floor (f32; the bf16 floor is half the written bytes)."""
    from benchmarks.plots import save_bars

    t = res["times_s"]
    keys = [("targets f32", "triton_f32"), ("targets bf16", "triton_bf16"), ("fused loss\nfwd+bwd", "loss_fused"),
            ("F.cross_entropy\nfwd+bwd", "loss_plain_ce")]
    ms = [tuple(1e3 * t[key].get(q, t[key]["median"]) for q in ("median", "p20", "p80")) for _, key in keys]
    png = save_bars(path, f"token-label kernels on {res['machine']}", "ms",
                    [name for name, _ in keys], {"time": ms}, reference=("targets f32 floor", 1e3 * res["floor_s"]["f32"]))
    if png:
        print(f"picture: {png}")


if __name__ == "__main__":
    main()
