"""Exponential moving average of model weights."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEma(nn.Module):
    """A frozen copy of ``model`` tracking ``ema = d * ema + (1 - d) * weights`` after each step.

    ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average is useful early in
    short runs and reaches ``decay`` later. Buffers (BatchNorm statistics) are copied, not averaged.
    Keep it on the same device as the model; pass the unwrapped model (not DDP)."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = True):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long), persistent=True)

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_p = [p for p in self.module.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        if len(ema_p) != len(src_p):
            raise ValueError("ModelEma.update: the model's parameters do not match the averaged copy")
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for e, s in zip(self.module.buffers(), model.buffers()):
            e.copy_(s)
        self.num_updates += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
