"""The training loop: the loss of a batch, one optimizer step over accumulated batches, one epoch."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .checkpoint import step_seed
from .metrics import format_seconds


class TrainForward(nn.Module):
    """Routes ``forward`` to the training pass (``forward_train`` of an LV-ViT or a token-labeling wrapper),
    so DistributedDataParallel and ``torch.compile`` see it; plain classifiers return their logits."""

    def __init__(self, model: nn.Module, token_model: bool):
        super().__init__()
        self.model = model
        self.token_model = token_model

    def forward(self, x, mix_box=None):
        return self.model.forward_train(x, mix_box) if self.token_model else self.model(x)


def make_loss_fn(args, token_model: bool) -> Callable:
    """``loss_fn(outputs, batch)`` for the run's label mode.

    * token labels, ``--label-mode tokens`` (LV-ViT or a wrapped timm model): the dense loss on every
      token and the class output, class target mixed by area (docs/spec.md section 3).
    * token labels, ``--label-mode class`` (any classifier): the pooled crop target on the class output
      (``batch.loss(logits)``).
    * no token labels: cross-entropy on hard labels, mixed by area when tokens were mixed.

    ``tl_fast.train.main(make_loss=...)`` takes another factory with this signature (experiments such
    as ``experiments/mix_class_target.py``)."""

    def loss_fn(outputs, batch):
        cls, tokens = outputs if token_model else (outputs, None)
        if not args.token_label:
            return batch.loss(cls)
        if tokens is None or args.label_mode != "tokens":  # the pooled crop target alone, from the compressed maps
            return batch.loss(cls, fused=args.fused_loss)
        return batch.loss(cls, tokens, fused=args.fused_loss, dense_weight=args.dense_weight)

    return loss_fn


class TrainStep:
    """Forward and backward of one loader batch; every ``accum_steps``-th call (or the epoch's last)
    also clips, steps the optimizer, the schedule and the EMA.

    Each batch's loss is divided by the size of its accumulation group, so accumulated gradients
    equal those of the group's batches taken at once (for models without batch statistics)."""

    def __init__(self, model: nn.Module, train_model: nn.Module, loss_fn: Callable, optimizer, scheduler=None,
                 ema=None, scaler=None, *, clip_grad: float = 0.0, accum_steps: int = 1,
                 amp_dtype: torch.dtype | None = None, seed: int = 0, rank: int = 0, mix_tokens: bool = False):
        self.model, self.train_model, self.loss_fn = model, train_model, loss_fn
        self.optimizer, self.scheduler, self.ema, self.scaler = optimizer, scheduler, ema, scaler
        self.clip_grad, self.accum_steps, self.amp_dtype = clip_grad, accum_steps, amp_dtype
        self.seed, self.rank, self.mix_tokens = seed, rank, mix_tokens
        self.device_type = next(model.parameters()).device.type

    def __call__(self, batch, global_step: int, index: int, group: int) -> torch.Tensor:
        """Batch ``index`` (0-based) of a group of ``group`` batches for optimizer step ``global_step``
        + 1; returns its loss (on the device, no sync)."""
        # The model's own randomness (drop path) is keyed by (seed, rank, step, batch): exact after a resume.
        torch.manual_seed(step_seed(self.seed, self.rank, global_step * self.accum_steps + index))
        if index == 0:
            self.optimizer.zero_grad(set_to_none=True)
        update = index == group - 1
        sync = nullcontext() if update or not hasattr(self.train_model, "no_sync") else self.train_model.no_sync()
        autocast = torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with sync:
            with autocast:
                outputs = self.train_model(batch.images, batch.mix_box) if self.mix_tokens else \
                    self.train_model(batch.images)
            loss = self.loss_fn(outputs, batch)
            scaled = loss / group if group > 1 else loss
            clip = self.clip_grad if self.clip_grad > 0 else None
            if self.scaler is not None:
                self.scaler(scaled, self.optimizer, clip_grad=clip, parameters=self.model.parameters(),
                            need_update=update)
            else:
                scaled.backward()
                if update:
                    if clip is not None:
                        nn.utils.clip_grad_norm_(self.model.parameters(), clip)
                    self.optimizer.step()
        if update:
            if self.scheduler is not None:
                self.scheduler.step_update(num_updates=global_step + 1)
            if self.ema is not None:
                self.ema.update(self.model, step=global_step + 1)
        return loss.detach()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def train_one_epoch(args, epoch: int, loader, step: TrainStep, state: dict, meter, log, dist, stop_at) -> bool:
    """One pass over ``loader`` from ``state['batch_in_epoch']``; returns False when ``stop_at``
    optimizer steps were reached (the stop falls on a step boundary, so the checkpoint resumes exactly)."""
    accum, total = args.grad_accum_steps, len(loader)
    bar = tqdm(total=total, initial=state["batch_in_epoch"], desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=args.no_progress or not dist.is_main, dynamic_ncols=True, leave=False)
    meter.start(state["global_step"])
    losses = []
    for batch in loader:
        index = state["batch_in_epoch"] % accum
        group = min(accum, total - (state["batch_in_epoch"] - index))  # the epoch's last group may be short
        losses.append(step(batch, state["global_step"], index, group))
        state["batch_in_epoch"] += 1
        bar.update(1)
        if index < group - 1:
            continue
        state["global_step"] += 1
        meter.update(batch.images.shape[0] * len(losses))  # drop_last: equal loader batches
        if state["global_step"] % args.log_every == 0 or state["batch_in_epoch"] == total:
            value = (sum(losses) / len(losses)).item()  # the only host sync in the loop, every --log-every steps
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {state['global_step']}; lower --lr or raise "
                                         "--clip-grad")
            bar.set_postfix(loss=f"{value:.3f}", img_s=f"{meter.images_per_s:.0f}", eta=format_seconds(meter.eta_s()))
            log.log("train", epoch=epoch, step=state["global_step"], loss=value, lr=step.lr(),
                    images_per_s=meter.images_per_s)
        losses = []
        if stop_at is not None and state["global_step"] >= stop_at:
            bar.close()
            return False
    bar.close()
    return True


def steps_per_epoch(num_batches: int, accum_steps: int) -> int:
    return math.ceil(num_batches / accum_steps)
