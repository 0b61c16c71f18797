"""Class-token targets and losses under MixToken beside the token targets of SPEC section 3: the
ground-truth cross-entropy mixed by the box (the class target of a batch without token labels,
``Batch.loss``, and the trainer's ground-truth term), and an experimental content-weighted mix."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import apply_mixtoken, mix_box_mask


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


def content_mixtoken(targets: torch.Tensor, mix_box, grid: tuple[int, int]) -> torch.Tensor:
    """MixToken on unmixed targets ``[B, 1 + T, K]`` like :func:`~tl_fast.ops.reference.apply_mixtoken`,
    except that the class target mixes the two images by what the mixed grid shows of each image's
    class, not by area (an experiment beside the SPEC rule; TokenMix-style weights taken from the
    annotator's own token targets).

    With ``y_b`` the top class of sample b's class target, the weight of sample b is the sum over its
    tokens left outside the box of their target for ``y_b``, that of the partner ``B-1-b`` the sum over
    the pasted tokens of their target for ``y_partner``; normalized, and the area ``lam`` where both
    are zero. When every token's target is one-hot on its image's class this is the area rule."""
    mixed = apply_mixtoken(targets, mix_box, grid)
    b, t = targets.shape[0], targets.shape[1] - 1
    inside = mix_box_mask(mix_box, b, grid, targets.device).reshape(b, t)
    cls = targets[:, 0]
    top = cls.argmax(-1).view(b, 1, 1).expand(b, t, 1)
    score = targets[:, 1:].gather(2, top).squeeze(2).float()  # [B, T]: each token's target for its image's class
    own = (score * ~inside).sum(1)
    pasted = (score.flip(0) * inside).sum(1)
    total = own + pasted
    w = torch.where(total > 0, own / total.clamp_min(1e-12), mix_lam(mix_box, b, grid).to(total.device))
    w = w.to(cls.dtype).view(b, 1)
    mixed[:, 0] = w * cls + (1 - w) * cls.flip(0)
    return mixed
