"""Optimizer parameter groups and the cosine learning-rate schedule with linear warm-up."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """Two AdamW groups: weights with ``weight_decay``, and without it every norm weight, bias,
    BatchNorm parameter and the names in ``model.no_weight_decay()`` (position embedding, class token).

    A parameter is exempt when it is 1-D (norm scales and all biases) or its name is listed."""
    skip = set(no_decay or ())
    if hasattr(model, "no_weight_decay"):
        skip |= set(model.no_weight_decay())
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0,
                  warmup_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step`` (0-based, per iteration): linear warm-up from
    ``warmup_ratio`` to 1 over ``warmup_steps``, then half a cosine down to ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_ratio: float = 0.01, warmup_ratio: float = 0.001) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :class:`LambdaLR` following :func:`cosine_factor` (step it after each
    optimizer step; its ``state_dict`` resumes exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_factor(s, total_steps, warmup_steps, min_ratio, warmup_ratio))


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 1024) -> float:
    """Linear scaling rule: ``base_lr`` is the rate for ``reference_batch`` images per step (all ranks)."""
    return base_lr * global_batch / reference_batch
