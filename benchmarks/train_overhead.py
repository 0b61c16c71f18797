#!/usr/bin/env python
"""Training-step overhead of token labeling: step time with the token-label loss vs class-token only.

Same model, same batch, same run; every variant is a full step (forward, loss, backward, AdamW).

* ``cls-only``:   ``F.cross_entropy`` of the class output on hard labels (the baseline). For a timm
  model, the bare model (``model(images)``), without the token-labeling wrapper.
* ``wrapper-hard`` (timm models): ``tl_fast.models.token_labeling(model)`` with MixToken, hard-label
  cross-entropy on the class and every token: the wrapper's own cost (hook, aux head, token logits).
* ``token-fused``: ``tl_fast.ops.token_label_loss`` straight from the compressed top-k maps, the
  geometry and the MixToken box (fused Triton kernel on CUDA, numba CPU path on CPU); MixToken on.
* ``token-targets``: targets materialized with ``tl_fast.ops.token_targets``, then the soft-target loss.

Reports medians (20th / 80th percentiles) and the ratio to ``cls-only`` (docs/spec.md section 5 targets
on GPU, B=128: ``token-fused`` <= 1.01x for LV-ViT-S, <= 1.02x for a timm ViT-S). Variants are
interleaved round by round so a drifting machine affects all of them alike. Rows: each variant against
``cls-only`` (``benchmarks/results/train_overhead.json``).

    python -m benchmarks.train_overhead                      # CPU: tiny model, small batch
    python -m benchmarks.train_overhead --device cuda        # LV-ViT-S, B=128, 224 px, bf16
    python -m benchmarks.train_overhead --device cuda --model vit_small_patch16_224   # timm ViT-S, wrapped
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import tl_fast.ops as ops
from benchmarks import harness
from benchmarks.common import crop_flip_plan, mix_box, smooth_topk_maps
from timm.optim import create_optimizer_v2
from tl_fast.models import MODEL_NAMES, create_lvvit, token_labeling

# token-fused over cls-only on a GPU at B=128 (docs/spec.md section 5): LV-ViT-S, and a wrapped timm ViT-S
STEP_TARGETS = {"lvvit_s": ("train-step-overhead", 1.01), "vit_small_patch16_224": ("timm-token-labeling", 1.02)}


def synthetic_batch(batch: int, img_size: int, grid: tuple[int, int], num_classes: int, topk: int,
                    map_size: int, device: torch.device, seed: int = 0):
    """Images, labels, annotator-like top-k maps, crop+flip plan affines and a MixToken box."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img_size, img_size, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    values, indices = smooth_topk_maps(batch, num_classes, topk, map_size, seed)
    affine = crop_flip_plan(batch, seed).affine_tensor(device)
    box = torch.tensor(mix_box(grid, seed), dtype=torch.int32)
    return (images.to(device), labels.to(device), values.to(device), indices.to(device), affine, box.to(device))


def make_steps(model, batch, num_classes: int, grid, amp: torch.dtype | None, smoothing: float = 0.1,
               bare: torch.nn.Module | None = None) -> dict[str, Callable[[], None]]:
    """The variants' step functions; ``bare`` is the timm model that ``model`` wraps (None for LV-ViT)."""
    images, labels, values, indices, affine, box = batch
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    maps = (values, indices)  # what TopKMaps holds; no store import (numba-free on a bare GPU machine)
    autocast = (lambda: torch.autocast(images.device.type, dtype=amp)) if amp else nullcontext

    def run(loss_fn, mix, net=None):
        with autocast():
            out = net(images) if net is not None else model.forward_train(images, box if mix else None)
        loss = loss_fn(*out) if isinstance(out, tuple) else loss_fn(out, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def fused(cls, tok):
        return ops.token_label_loss(cls, tok, maps=maps, affine=affine, mix_box=box, num_classes=num_classes,
                                    grid=grid, smoothing=smoothing)

    def materialized(cls, tok):
        t = ops.token_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=smoothing,
                              mix_box=box)
        return ops.token_label_loss(cls, tok, t)

    def hard(cls, tok):
        loss = F.cross_entropy(cls.float(), labels, label_smoothing=smoothing)
        if tok is None:
            return loss
        per_token = labels.repeat_interleave(tok.shape[1])
        return loss + F.cross_entropy(tok.flatten(0, 1).float(), per_token, label_smoothing=smoothing)

    steps = {"cls-only": lambda: run(hard, False, bare)} if bare is not None else \
        {"cls-only": lambda: run(lambda c, t: hard(c, None), False)}
    if bare is not None:
        steps["wrapper-hard"] = lambda: run(hard, True)
    steps.update({"token-fused": lambda: run(fused, True), "token-targets": lambda: run(materialized, True)})
    return steps


def measure(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, rounds: int) -> dict:
    """Medians per variant, and each variant's median over rounds of its time over ``cls-only``'s in the
    same round (``paired``: steadier than a ratio of medians on a machine whose speed drifts)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = harness.interleaved(steps, rounds, warmup, sync)
    base = np.asarray(times["cls-only"].seconds)
    return {k: {**{f"{q}_ms": v for q, v in t.stats(1e3).items()},
                "paired": float(np.median(np.asarray(t.seconds) / base))} for k, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", help="an LV-ViT size or any timm model (wrapped by tl_fast.models.token_labeling); "
                   "default: lvvit_s on cuda, lvvit_demo on cpu")
    p.add_argument("--patch-size", type=int, help="timm ViTs: another patch size (e.g. 8 for a small CPU run)")
    p.add_argument("--depth", type=int, help="timm ViTs: another depth")
    p.add_argument("--batch-size", type=int, help="default: 128 on cuda, 16 on cpu")
    p.add_argument("--img-size", type=int, help="default: 224 on cuda, 64 on cpu")
    p.add_argument("--num-classes", type=int, help="default: 1000 on cuda, 100 on cpu")
    p.add_argument("--map-size", type=int, default=18, help="label map side (18 = NFNet-F6 ImageNet maps)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--amp", choices=("bf16", "none"), help="default: bf16 on cuda, none on cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, help="timed steps per variant (default: 30 on cuda, 8 on cpu)")
    p.add_argument("--skip-targets", action="store_true", help="leave out the materialized-targets variant")
    p.add_argument("--json", help="also write the results here")
    harness.add_record_arguments(p)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible")
    model_name = args.model or ("lvvit_s" if gpu else "lvvit_demo")
    bsz, img = args.batch_size or (128 if gpu else 16), args.img_size or (224 if gpu else 64)
    k = args.num_classes or (1000 if gpu else 100)
    amp = {"bf16": torch.bfloat16, "none": None}[args.amp or ("bf16" if gpu else "none")]
    rounds = args.rounds or (30 if gpu else 8)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if model_name in MODEL_NAMES:
        bare, model = None, create_lvvit(model_name, num_classes=k, img_size=img).to(device).train()
    else:
        import timm
        arch = {k_: v for k_, v in dict(patch_size=args.patch_size, depth=args.depth).items() if v is not None}
        bare = timm.create_model(model_name, num_classes=k, img_size=img, **arch).to(device).train()
        model = token_labeling(bare)
    grid = model.token_grid(img)
    batch = synthetic_batch(bsz, img, grid, k, args.topk, args.map_size, device)
    steps = make_steps(model, batch, k, grid, amp, bare=bare)
    if args.skip_targets:
        steps.pop("token-targets")
    res = measure(steps, device, args.warmup, rounds)
    name = harness.machine_name(args.device)
    base = res["cls-only"]["median_ms"]
    print(f"train step overhead of token labeling: {model_name}, B={bsz}, {img}px, grid {grid[0]}x{grid[1]}, K={k}, "
          f"{args.map_size}x{args.map_size} top-{args.topk} maps, amp={args.amp or ('bf16' if gpu else 'none')}, on {name}")
    for v, r in res.items():
        print(f"  {v:14s} median {r['median_ms']:9.2f} ms  (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f})  "
              f"{r['median_ms'] / base:.3f}x cls-only, paired by round {r['paired']:.3f}x")
    out = {"device": name, "model": model_name, "batch": bsz, "img_size": img, "num_classes": k, "rounds": rounds,
           "results": res, "ratio_fused": res["token-fused"]["median_ms"] / base}
    if "wrapper-hard" in res:
        out["ratio_wrapper"] = res["wrapper-hard"]["median_ms"] / base
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    harness.record("train_overhead", rows(args, res, model_name, bsz, img, k, rounds, bare is not None), args, argv,
                   device=args.device)
    return out


def rows(args, res: dict, model_name: str, bsz: int, img: int, k: int, rounds: int, wrapped: bool) -> list[dict]:
    """Each variant's step against ``cls-only``; the goal on ``token-fused`` at the spec's sizes on a GPU."""
    gpu = args.device == "cuda"
    arch = "".join(f", {n} {v}" for n, v in (("patch", args.patch_size), ("depth", args.depth)) if v is not None)
    config = (f"{model_name}{arch}, B={bsz}, {img} px, K={k}, {args.map_size}x{args.map_size} top-{args.topk} maps, "
              f"amp {args.amp or ('bf16' if gpu else 'none')}, {args.device}; {rounds} interleaved rounds")
    target, goal = STEP_TARGETS.get(model_name, ("timm-token-labeling" if wrapped else "train-step-overhead", None))
    at_spec_size = gpu and bsz == 128 and img == 224 and not arch and goal is not None
    base = res["cls-only"]["median_ms"]
    family = "timm model wrapped by token_labeling" if wrapped else "LV-ViT"
    baseline = ("the bare timm model's step on hard labels" if wrapped else
                "the same step, class token only on hard labels")
    out = []
    for key, what in (("wrapper-hard", "the wrapper alone (hard labels on the class and every token), MixToken"),
                      ("token-fused", "token labeling with the fused loss, MixToken"),
                      ("token-targets", "token labeling, targets materialized + soft CE, MixToken")):
        if key not in res:
            continue
        ratio = res[key]["median_ms"] / base
        out.append(harness.row(f"{family} step, {what}", config, res[key]["median_ms"], "ms", target=target,
                               spread_of={"p20": res[key]["p20_ms"], "p80": res[key]["p80_ms"]}, baseline=baseline,
                               baseline_value=base, ratio=ratio, ratio_of="value / baseline",
                               goal=f"<= {goal}x" if key == "token-fused" and at_spec_size else None,
                               meets=goal is not None and ratio <= goal, paired_ratio=res[key]["paired"]))
    return out


if __name__ == "__main__":
    main()
