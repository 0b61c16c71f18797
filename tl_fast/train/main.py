"""``tl-fast train`` / ``python -m tl_fast.train`` / ``examples/train_lvvit.py``: set-up, the epoch loop,
evaluation, checkpoints and the closing plot. The pieces live in :mod:`.factories` and :mod:`.loop`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..models.digest import weights_digest
from ..optional import MissingDependency
from .checkpoint import read_checkpoint, resume, rng_state, save_checkpoint
from .checks import InputError, check_batches, check_output, data_errors
from .config import apply_preset, build_parser, check_args
from .distributed import (
    all_gather_object, barrier, broadcast_buffers, cleanup_distributed, setup_distributed,
)
from .factories import (
    AMP_DTYPES, create_model, is_token_model, load_initial_checkpoint, make_ema, make_loaders, make_optimizer,
    make_scaler, make_scheduler, prepare_model, scaled_lr, supervises_tokens, token_patch,
)
from .loop import TrainForward, TrainStep, make_loss_fn, steps_per_epoch, train_one_epoch
from .metrics import JsonlLogger, ThroughputMeter, evaluate


def main(argv: list[str] | None = None, prog: str | None = None, *,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         make_loss: Callable[[argparse.Namespace, bool], Callable] | None = None) -> dict:
    """Parse ``argv`` and train; returns the last evaluation (and the run's end record).

    An experiment can add its own options (``add_arguments(parser)``) and replace the loss
    (``make_loss(args, token_model) -> loss_fn(outputs, batch)``, like :func:`make_loss_fn`) without
    a copy of the trainer; the checkpoint, resume, logging and evaluation stay the same."""
    parser = build_parser(prog)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(args, parser, make_loss or make_loss_fn)


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser,
                make_loss: Callable[[argparse.Namespace, bool], Callable] = make_loss_fn) -> dict:
    """:func:`run`, with input errors (a bad flag, file or dataset; a missing optional package) as one
    ``error:`` line and exit status 2 instead of a traceback."""
    try:
        return run(args, parser, make_loss)
    except (MissingDependency, InputError) as err:  # e.g. --loader dali without DALI: what to install
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def locate_data(args: argparse.Namespace, dist) -> None:
    """Train / val folders and the label store: ``--data``, or the demo dataset (built by rank 0 first)."""
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


def run(args: argparse.Namespace, parser: argparse.ArgumentParser,
        make_loss: Callable[[argparse.Namespace, bool], Callable] = make_loss_fn) -> dict:
    apply_preset(args)
    check_args(parser, args)
    out = check_output(args.output)
    dist = setup_distributed(args.device)
    args.amp = args.amp or ("bf16" if dist.device.type == "cuda" else "none")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    locate_data(args, dist)
    torch.manual_seed(args.seed)
    probe = prepare_model(create_model(args, num_classes=1), args)
    token_model = is_token_model(probe)
    if args.mixtoken is None:
        args.mixtoken = supervises_tokens(args) and token_model
    patch = token_patch(probe, args.img_size, token_model)  # the loader's grid is the model's token grid
    del probe
    with data_errors(args):
        train_loader, val_loader = make_loaders(args, dist, patch, token_model)
    check_batches(train_loader, args, dist.world_size)
    # After the probe: today's initial weights. A wrapped model holds its aux head (EMA, checkpoints).
    model = prepare_model(create_model(args, num_classes=train_loader.num_classes), args)
    if args.initial_checkpoint:
        reinit = load_initial_checkpoint(model, args.initial_checkpoint, train_loader.classes)
        if dist.is_main:
            print(f"weights from {args.initial_checkpoint}" + (f"; re-initialized {', '.join(reinit)}" if reinit else ""))
    model = model.to(dist.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    ema = make_ema(args, model)
    train_model: nn.Module = TrainForward(model, token_model)
    if args.torchcompile:
        train_model = torch.compile(train_model, backend=args.torchcompile)
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=token_model and not supervises_tokens(args))  # class output only: no aux gradient
    lr = scaled_lr(args.lr, args.batch_size * dist.world_size)
    opt = make_optimizer(args, model, lr)
    steps = steps_per_epoch(len(train_loader), args.grad_accum_steps)
    sched = make_scheduler(args, opt, steps, lr)
    scaler = make_scaler(args, dist.device)
    state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "best_top1": None, "best_epoch": None}
    log = JsonlLogger(out / "log.jsonl" if dist.is_main else None)
    header = dict(args={k: str(v) for k, v in vars(args).items()}, world_size=dist.world_size, lr=lr,
                  steps_per_epoch=steps, params=sum(p.numel() for p in model.parameters()))
    if args.resume:
        path = out / "last.pth" if args.resume == "auto" else Path(args.resume)
        state = resume(path, read_checkpoint(path, dist.device), train_loader.classes, model=model, ema=ema,
                       optimizer=opt, scheduler=sched, scaler=scaler, loader=train_loader)
        log.log("resume", step=state["global_step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                checkpoint=str(path), **header)
    else:
        log.log("start", **header)
    step = TrainStep(model, train_model, make_loss(args, token_model), opt, sched, ema, scaler,
                     clip_grad=args.clip_grad, accum_steps=args.grad_accum_steps, amp_dtype=AMP_DTYPES[args.amp],
                     seed=args.seed, rank=dist.rank, mix_tokens=token_model and args.mixtoken)
    if dist.is_main:
        labels = ("token labels" if token_model and supervises_tokens(args) else "pooled crop labels") \
            if args.token_label else "hard labels"
        print(f"{args.model}: {header['params'] / 1e6:.2f}M params, {train_loader.num_classes} classes, "
              f"{args.img_size}px, {steps} steps/epoch x {args.epochs} epochs, {args.loader} loader, {labels}, "
              f"MixToken {'on' if args.mixtoken else 'off'}, {args.opt} lr {lr:.2e} {args.sched}, amp {args.amp}, "
              f"{dist.world_size} process(es) on {dist.device.type}"
              + (f", resumed at step {state['global_step']}" if args.resume else ""), flush=True)
    meter, result = ThroughputMeter(args.epochs * steps, dist.world_size), {}
    while state["epoch"] < args.epochs:
        epoch = state["epoch"]
        if state["batch_in_epoch"] == 0:
            train_loader.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        finished = train_one_epoch(args, epoch, train_loader, step, state, meter, log, dist, args.max_steps)
        broadcast_buffers(model)  # BatchNorm statistics: rank 0's on every rank, before eval and saving
        if ema is not None:
            broadcast_buffers(ema)
        best = False
        if finished:
            state.update(epoch=epoch + 1, batch_in_epoch=0)
            result = {"epoch": epoch + 1, "train_images_per_s": meter.images_per_s, "epoch_s": time.perf_counter() - t0}
            if (epoch + 1) % max(args.eval_every, 1) == 0 or epoch + 1 == args.epochs:
                result.update(evaluate_models(args, model, ema, val_loader, dist, token_model))
                best = _update_best(state, result)
            log.log("epoch", **result, best=best)
            if dist.is_main:
                accuracy = (f"top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% | "
                            + (f"EMA top-1 {result['ema_top1']:.2f}% | " if "ema_top1" in result else "")) \
                    if "top1" in result else ""
                print(f"epoch {epoch + 1}/{args.epochs}: {accuracy}{result['train_images_per_s']:.1f} img/s", flush=True)
        loader_state = train_loader.state_dict()
        if dist.is_main:
            ckpt = {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None, "state": dict(state),
                    "rng": rng_state(), "loader": loader_state, "args": vars(args),
                    "classes": list(train_loader.classes)}  # the ids' names: resume and fine-tune check them
            save_checkpoint(out / "last.pth", ckpt)
            if best:
                save_checkpoint(out / "best.pth", ckpt)
        barrier()
        if not finished:
            break
    digests = all_gather_object(weights_digest(model))
    result.update(global_step=state["global_step"], rank_digests=digests, ranks_agree=len(set(digests)) == 1,
                  best_top1=state["best_top1"], best_epoch=state["best_epoch"])
    log.log("end", **result)
    log.close()
    if dist.is_main:
        _closing_lines(args, result, state, dist, out)
    cleanup_distributed()
    return result


def _update_best(state: dict, result: dict) -> bool:
    """Best epoch by val top-1 of the model or its EMA, whichever is higher."""
    top1 = max(result["top1"], result.get("ema_top1", float("-inf")))
    if state["best_top1"] is None or top1 > state["best_top1"]:
        state.update(best_top1=top1, best_epoch=result["epoch"])
        return True
    return False


def _closing_lines(args, result: dict, state: dict, dist, out: Path) -> None:
    if "top1" in result and state["epoch"] == args.epochs:
        ema = f" (EMA {result['ema_top1']:.2f}%)" if "ema_top1" in result else ""
        print(f"final: top-1 {result['top1']:.2f}%{ema}, top-5 {result['top5']:.2f}%, train "
              f"{result['train_images_per_s']:.1f} img/s on {dist.world_size} {dist.device.type} process(es); best "
              f"top-1 {state['best_top1']:.2f}% at epoch {state['best_epoch']} ({out / 'best.pth'})")
    if args.plot:
        from ..optional import MissingDependency
        from .plot import plot_run
        try:
            print(f"curves: {plot_run(out)}")
        except MissingDependency as err:
            print(f"curves: not drawn ({err})")
    print(f"log: {out / 'log.jsonl'}, checkpoint: {out / 'last.pth'}", flush=True)


def evaluate_models(args, model, ema, val_loader, dist, token_model: bool) -> dict:
    """Model and EMA in one pass over the val split. Token-labeled (LV-ViT or a wrapped timm model): the
    inference rule (cls + 0.5 max token); a token model trained on its class output alone: the class head
    (the auxiliary head was never trained); others: their logits."""
    if val_loader is None:
        return {}
    model.eval()
    nets = {"": model, **({"ema_": ema.module} if ema is not None else {})}
    cls_only = token_model and not supervises_tokens(args)
    predict = {k: ((lambda x, n=n: n.forward_train(x)[0]) if cls_only else n) for k, n in nets.items()}
    return evaluate(predict, val_loader, device=dist.device, amp_dtype=AMP_DTYPES[args.amp],
                    progress=dist.is_main and not args.no_progress, desc="eval")


if __name__ == "__main__":
    main()
    sys.exit(0)
