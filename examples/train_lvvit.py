#!/usr/bin/env python
"""Train LV-ViT with token labeling: a thin trainer over ``tl_fast.TokenLabelLoader``.

With no ``--data``, it trains a CPU-sized LV-ViT on the built-in demo dataset (generated, annotated
and stored on first use) so the whole path runs on a laptop. On ImageNet::

    torchrun --nproc_per_node 8 examples/train_lvvit.py --loader dali --data /imagenet \\
        --labels /imagenet/labels.tlstore --model lvvit_s

Reusable pieces (optimizer groups, schedule, EMA, checkpoints, evaluation, logging, DDP) live in
:mod:`tl_fast.train`; this file holds the argument parser, the factories and the loop.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from tl_fast import ops
from tl_fast.models import MODEL_NAMES, create_lvvit
from tl_fast.ops.class_loss import content_mixtoken
from tl_fast.plan import AugmentConfig, RandAugmentConfig
from tl_fast.train import (
    JsonlLogger, ModelEma, ThroughputMeter, all_gather_object, barrier, broadcast_buffers, cleanup_distributed,
    cosine_schedule, evaluate, format_seconds, load_checkpoint, mixed_label_loss, param_groups, rng_state,
    save_checkpoint, scaled_lr, set_rng_state, setup_distributed, step_seed,
)

# Defaults that depend on the data: the demo preset is sized for two CPU cores and a few minutes.
PRESETS = {
    "demo": dict(model="lvvit_demo", img_size=64, epochs=10, batch_size=64, lr=0.02, warmup_epochs=1.0,
                 drop_path=0.0, aa="none", crop_scale=0.25, reprob=0.0, workers=2),
    "imagenet": dict(model="lvvit_s", img_size=224, epochs=300, batch_size=128, lr=1.6e-3, warmup_epochs=5.0,
                     drop_path=0.1, aa="rand-m9-mstd0.5-inc1", crop_scale=0.08, reprob=0.25, workers=8),
}


EPILOG = """examples:
  python examples/train_lvvit.py --loader torch                  # demo data, CPU-sized LV-ViT, a few minutes
  python examples/train_lvvit.py --no-token-label                # the same, class-token labels only (baseline)
  python examples/train_lvvit.py --resume                        # continue exactly from <output>/last.pth
  torchrun --nproc_per_node 8 examples/train_lvvit.py --loader dali --data /imagenet \\
      --labels /imagenet/labels.tlstore --model lvvit_s           # LV-ViT-S recipe (lr 1.6e-3 per 1024 images)

--batch-size is per process; --lr is for a global batch of 1024 and scaled linearly by
batch-size x processes / 1024. Every epoch writes <output>/last.pth atomically and evaluates top-1/top-5
of the model and its EMA on the val split; <output>/log.jsonl has one JSON object per logged step/epoch.
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except unset options (those come from the preset)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    presets = "\n".join(textwrap.fill(f"{k}: " + ", ".join(f"{a}={v}" for a, v in d.items()), 100,
                                       subsequent_indent="    ") for k, d in PRESETS.items())
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + "\n\nOptions left unset come from --preset: 'demo' without "
        "--data, 'imagenet' (the LV-ViT-S recipe) with it.\n" + presets,
        formatter_class=_Help, epilog=EPILOG)
    d = p.add_argument_group("data")
    d.add_argument("--preset", choices=tuple(PRESETS), help="defaults for unset options (default: demo without "
                   "--data, imagenet with it)")
    d.add_argument("--loader", choices=("dali", "ffcv", "torch"), default="torch",
                   help="image pipeline; ffcv packs a .beton beside the data on first use")
    d.add_argument("--data", help="image root holding train/<class>/* and val/<class>/* (default: demo dataset)")
    d.add_argument("--labels", help="label store of the train split (tl-fast annotate / convert-pt); "
                   "default with --data: <data>/labels.tlstore")
    d.add_argument("--workers", type=int, help="loader worker processes / threads")
    d.add_argument("--img-size", type=int, help="training and evaluation resolution")
    d.add_argument("--aa", help="RandAugment spec such as rand-m9-mstd0.5-inc1, or 'none'")
    d.add_argument("--crop-scale", type=float, help="smallest random-resized-crop area fraction")
    d.add_argument("--reprob", type=float, help="random-erasing probability (0: off)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=MODEL_NAMES, help="LV-ViT size (lvvit_demo: a CPU-sized one)")
    m.add_argument("--depth", type=int, help="override the number of blocks")
    m.add_argument("--dim", type=int, help="override the width (must divide by --heads)")
    m.add_argument("--heads", type=int, help="override the number of attention heads")
    m.add_argument("--patch-size", type=int, help="override the patch size")
    m.add_argument("--drop-path", type=float, help="stochastic depth rate")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="images per process and step")
    t.add_argument("--lr", type=float, help="AdamW learning rate for a global batch of 1024 (scaled linearly)")
    t.add_argument("--min-lr-ratio", type=float, default=0.01, help="final learning rate / peak")
    t.add_argument("--warmup-epochs", type=float, help="linear warm-up length")
    t.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms, biases, pos/cls")
    t.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    t.add_argument("--ema-decay", type=float, default=0.9998, help="EMA decay (warmed up as (1+n)/(10+n))")
    t.add_argument("--token-label", action=argparse.BooleanOptionalAction, default=True,
                   help="dense loss on every token from the label store; off: class-token CE on hard labels")
    t.add_argument("--mixtoken", action=argparse.BooleanOptionalAction,
                   help="MixToken: tokens inside the batch's box come from the partner sample B-1-b (default: on "
                   "with token labels, off without; --no-token-label --mixtoken mixes the hard labels by area, "
                   "a token-level CutMix baseline)")
    t.add_argument("--mixtoken-per-sample", action="store_true", help="one MixToken box per sample")
    t.add_argument("--mix-cls-target", choices=("area", "content"), default="area",
                   help="how MixToken mixes the class-token target: 'area' (LV-ViT, SPEC), or 'content', an "
                   "experiment weighing each image by how much of its class the mixed tokens' targets show "
                   "(materializes the targets)")
    t.add_argument("--dense-weight", type=float, default=1.0, help="weight of the token loss (paper: 0.5)")
    t.add_argument("--gt-weight", type=float, default=0.0,
                   help="share of the ground-truth label in the class-token target (MixToken-mixed); the rest is "
                   "the annotator's pooled crop target. 0: pure token labeling (SPEC); helps a weak annotator")
    t.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    t.add_argument("--label-compat", choices=("tl_fast", "official"), default="tl_fast",
                   help="official: the official TokenLabeling targets (crop box passed to roi_align as (y1, x1, y2, "
                   "x2), smoothing t(1-s+s/K)+s/K), to reproduce the published recipe; README: Differences")
    t.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the token loss from the compressed maps without materializing targets")
    t.add_argument("--amp", choices=("bf16", "none"), help="autocast dtype (default: bf16 on GPU, none on CPU)")
    t.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    t.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("output")
    o.add_argument("--output", default="runs/lvvit", help="folder for last.pth and log.jsonl")
    o.add_argument("--resume", nargs="?", const="auto", help="resume exactly from a checkpoint (default <output>/last.pth)")
    o.add_argument("--max-steps", type=int, help="stop after this many steps in all, with a resumable checkpoint")
    o.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (the last epoch always "
                   "evaluates)")
    o.add_argument("--log-every", type=int, default=10, help="steps between logged losses (each costs a sync)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def resolve(args: argparse.Namespace, dist) -> argparse.Namespace:
    """Fill unset options from the preset; locate (or build, on rank 0 first) the data."""
    args.preset = args.preset or ("imagenet" if args.data else "demo")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is None:
        from tl_fast.demo import prepare
        if not dist.is_main:
            barrier()  # rank 0 builds the demo data once; the others then find it ready
        demo = prepare(progress=dist.is_main and not args.no_progress)
        if dist.is_main:
            barrier()
        args.train_dir, args.val_dir, args.labels = demo.train, demo.val, args.labels or demo.labels
    else:
        args.train_dir, args.val_dir = Path(args.data) / "train", Path(args.data) / "val"
        args.labels = args.labels or str(Path(args.data) / "labels.tlstore")
    if args.mixtoken is None:
        args.mixtoken = args.token_label
    return args


def make_loaders(args, dist):
    from tl_fast import TokenLabelLoader
    from tl_fast.augment import EraseConfig
    aa = None if args.aa in (None, "none") else RandAugmentConfig.parse(args.aa)
    common = dict(backend=args.loader, batch_size=args.batch_size, image_size=args.img_size, patch_size=args.patch,
                  device=dist.device, num_workers=args.workers, rank=dist.rank, world_size=dist.world_size,
                  smoothing=args.smoothing, seed=args.seed)
    train = TokenLabelLoader(_images(args, args.train_dir, dist), args.labels if args.token_label else None,
                             augment=AugmentConfig(scale=(args.crop_scale, 1.0), randaugment=aa), train=True,
                             erase=EraseConfig(prob=args.reprob) if args.reprob > 0 else None,
                             mixtoken=args.mixtoken, mixtoken_per_sample=args.mixtoken_per_sample,
                             token_labels=args.token_label, label_compat=args.label_compat, **common)
    val = TokenLabelLoader(_images(args, args.val_dir, dist), None, train=False, mixtoken=False, **common) \
        if Path(args.val_dir).is_dir() else None
    return train, val


def _images(args, folder, dist):
    """FFCV reads a .beton: pack one beside the image folder on first use (rank 0; the others wait).
    The train split is packed with its label store; the val split without labels (eval reads no maps)."""
    if args.loader != "ffcv":
        return folder
    from tl_fast.loaders.ffcv_pack import pack_ffcv
    folder = Path(folder)
    train = folder == Path(args.train_dir)
    store = str(args.labels) if train else None
    out = folder.parent / (f"{folder.name}-{Path(args.labels).stem}.beton" if train else f"{folder.name}.beton")
    if dist.is_main and not out.exists():
        print(f"packing {folder} into {out} (first use of --loader ffcv)", flush=True)
        pack_ffcv(str(folder), store, str(out), num_workers=max(args.workers, 1), progress=not args.no_progress)
    barrier()
    return str(out)


class TrainForward(nn.Module):
    """Routes ``forward`` to ``forward_train`` so DistributedDataParallel's hooks see the training pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, mix_box=None):
        return self.model.forward_train(x, mix_box)


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_one_epoch(args, epoch, loader, step_fn, state, meter, log, dist, stop_at):
    """One pass over ``loader`` from ``state['step_in_epoch']``; returns False when ``stop_at`` was reached."""
    bar = tqdm(total=len(loader), initial=state["step_in_epoch"], desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=args.no_progress or not dist.is_main, dynamic_ncols=True, leave=False)
    meter.start(state["global_step"])
    for batch in loader:
        loss = step_fn(batch)
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        meter.update(batch.images.shape[0])
        bar.update(1)
        if state["global_step"] % args.log_every == 0 or state["step_in_epoch"] == len(loader):
            value = loss.item()  # the only host sync in the loop, every --log-every steps
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {state['global_step']}; lower --lr or raise --clip-grad")
            bar.set_postfix(loss=f"{value:.3f}", img_s=f"{meter.images_per_s:.0f}", eta=format_seconds(meter.eta_s()))
            log.log("train", epoch=epoch, step=state["global_step"], loss=value, lr=step_fn.lr(), images_per_s=meter.images_per_s)
        if stop_at is not None and state["global_step"] >= stop_at:
            bar.close()
            return False
    bar.close()
    return True


def make_step(args, model, train_model, opt, sched, ema, dist, state):
    """One optimizer step on a batch; returns the loss (on the device, no sync)."""
    amp = torch.autocast(dist.device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()

    def step(batch):
        # The model's own randomness (drop path) is keyed by (seed, rank, step): exact after a resume.
        torch.manual_seed(step_seed(args.seed, dist.rank, state["global_step"]))
        with amp:
            cls, tokens = train_model(batch.images, batch.mix_box if args.mixtoken else None)
        if not args.token_label:  # hard labels, mixed by area when the tokens were mixed (the batch has no maps)
            loss = batch.loss(cls)
        else:
            # The class-token target is linear in its parts: (1 - w) * annotator + w * ground truth.
            weights = dict(cls_weight=1.0 - args.gt_weight, dense_weight=args.dense_weight)
            if args.mix_cls_target == "content" and batch.mix_box is not None:
                targets = content_mixtoken(replace(batch, mix_box=None).token_targets(), batch.mix_box, batch.grid)
                loss = ops.token_label_loss(cls, tokens, targets, **weights)
            else:
                loss = batch.loss(cls, tokens, fused=args.fused_loss, **weights)
            if args.gt_weight > 0:
                loss = loss + args.gt_weight * mixed_label_loss(cls, batch.labels, batch.mix_box, batch.grid,
                                                                args.smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        sched.step()
        ema.update(model)
        return loss.detach()

    step.lr = lambda: opt.param_groups[0]["lr"]
    return step


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    dist = setup_distributed(args.device)
    args = resolve(args, dist)
    args.amp = args.amp or ("bf16" if dist.device.type == "cuda" else "none")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    overrides = {k: v for k, v in dict(depth=args.depth, embed_dim=args.dim, num_heads=args.heads,
                                        patch_size=args.patch_size).items() if v is not None}
    probe = create_lvvit(args.model, num_classes=1, img_size=args.img_size, **overrides)
    args.patch = probe.patch_embed.patch_size
    train_loader, val_loader = make_loaders(args, dist)
    model = create_lvvit(args.model, num_classes=train_loader.num_classes, img_size=args.img_size,
                         drop_path_rate=args.drop_path, **overrides).to(dist.device)
    ema = ModelEma(model, args.ema_decay)
    train_model = TrainForward(model)
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=not args.token_label)  # class-token only: aux_head gets no gradient
    lr = scaled_lr(args.lr, args.batch_size * dist.world_size)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999))
    steps = len(train_loader)
    sched = cosine_schedule(opt, args.epochs * steps, round(args.warmup_epochs * steps), args.min_lr_ratio)
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    out = Path(args.output)
    if args.resume:
        ckpt = load_checkpoint(out / "last.pth" if args.resume == "auto" else args.resume, dist.device)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        set_rng_state(ckpt["rng"])
        train_loader.set_epoch(state["epoch"])
        train_loader.load_state_dict(ckpt["loader"])
    step_fn = make_step(args, model, train_model, opt, sched, ema, dist, state)
    log = JsonlLogger(out / "log.jsonl" if dist.is_main else None)
    log.log("start", args={k: str(v) for k, v in vars(args).items()}, world_size=dist.world_size, lr=lr,
            steps_per_epoch=steps, params=sum(p.numel() for p in model.parameters()))
    if dist.is_main:
        print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {train_loader.num_classes} "
              f"classes, {args.img_size}px, {steps} steps/epoch x {args.epochs} epochs, {args.loader} loader, "
              f"token labels {'on' if args.token_label else 'off'}, MixToken {'on' if args.mixtoken else 'off'}, "
              f"lr {lr:.2e}, {dist.world_size} process(es) on {dist.device.type}", flush=True)
    meter, result = ThroughputMeter(args.epochs * steps, dist.world_size), {}
    stop_at = args.max_steps
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        if state["step_in_epoch"] == 0:
            train_loader.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        finished = train_one_epoch(args, epoch, train_loader, step_fn, state, meter, log, dist, stop_at)
        broadcast_buffers(model)  # BatchNorm statistics: rank 0's on every rank, before eval and saving
        broadcast_buffers(ema)
        if finished:
            state.update(epoch=epoch + 1, step_in_epoch=0)
            result = {"epoch": epoch + 1, "train_images_per_s": meter.images_per_s, "epoch_s": time.perf_counter() - t0}
            if (epoch + 1) % max(args.eval_every, 1) == 0 or epoch + 1 == args.epochs:
                result.update(_evaluate_both(args, model, ema, val_loader, dist))
            log.log("epoch", **result)
            if dist.is_main:
                accuracy = (f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% | EMA top-1 "
                            f"{result['ema_top1']:.2f}% | ") if "top1" in result else ""
                print(f"epoch {epoch + 1}/{args.epochs}: {accuracy}{result['train_images_per_s']:.1f} img/s", flush=True)
        loader_state = train_loader.state_dict()
        if dist.is_main:
            save_checkpoint(out / "last.pth", {"model": model.state_dict(), "ema": ema.state_dict(),
                                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                               "state": dict(state), "rng": rng_state(), "loader": loader_state,
                                               "args": vars(args)})
        barrier()
        if not finished:
            break
    digests = all_gather_object(weights_digest(model))
    result.update(global_step=state["global_step"], rank_digests=digests, ranks_agree=len(set(digests)) == 1)
    log.log("end", **result)
    log.close()
    if dist.is_main and "top1" in result and state["epoch"] == args.epochs:
        print(f"final: top-1 {result['top1']:.2f}% (EMA {result['ema_top1']:.2f}%), top-5 {result['top5']:.2f}%, "
              f"train {result['train_images_per_s']:.1f} img/s on {dist.world_size} {dist.device.type} process(es)")
    cleanup_distributed()
    return result


def _evaluate_both(args, model, ema, val_loader, dist) -> dict:
    """Model and EMA in one pass over the val split. Token labeling: LV-ViT's rule (cls + 0.5 max
    token); class-token only: the class head alone (the auxiliary head was never trained)."""
    if val_loader is None:
        return {}
    model.eval()
    nets = {"": model, "ema_": ema.module}
    predict = {k: (n if args.token_label else (lambda x, n=n: n.forward_train(x)[0])) for k, n in nets.items()}
    return evaluate(predict, val_loader, device=dist.device, amp_dtype=torch.bfloat16 if args.amp == "bf16" else None,
                    progress=dist.is_main and not args.no_progress, desc="eval")


if __name__ == "__main__":
    main()
    sys.exit(0)
