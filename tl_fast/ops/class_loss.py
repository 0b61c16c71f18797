"""The ground-truth class loss under MixToken beside the token targets of docs/spec.md section 3: hard-label
cross-entropy mixed by the box's area (the class target of a batch without token labels,
``Batch.loss``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import mix_box_mask


def mix_lam(mix_box: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """``lam = 1 - box_area / (Gh * Gw)`` per sample (``[B]`` float32) for a ``[4]`` or ``[B, 4]`` box:
    the share of tokens outside the same mask the model and the targets use."""
    inside = mix_box_mask(mix_box, batch, grid)
    return 1.0 - inside.sum((1, 2)).float() / float(grid[0] * grid[1])


def mixed_label_loss(cls_logits: torch.Tensor, labels: torch.Tensor, mix_box: torch.Tensor | None,
                     grid: tuple[int, int], smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the class logits against the ground-truth labels, label-smoothed and mixed
    like MixToken's class target: ``lam * y[b] + (1 - lam) * y[B - 1 - b]`` (cross-entropy is
    linear in the target, so this is the mix of two hard-label losses)."""
    logits = cls_logits.float()
    own = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    if mix_box is None:
        return own.mean()
    partner = F.cross_entropy(logits, labels.flip(0), label_smoothing=smoothing, reduction="none")
    lam = mix_lam(mix_box.to(logits.device), logits.shape[0], grid)
    return (lam * own + (1.0 - lam) * partner).mean()
