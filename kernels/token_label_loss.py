"""Fused token-labeling loss: soft-target cross-entropy straight from compressed maps (SPEC section 3).

    loss = cls_weight * mean_b CE(cls_logits[b], t[b, 0]) + dense_weight * mean_{b, i} CE(token_logits[b, i], t[b, 1 + i])
    CE(z, t) = -sum_c t_c * log_softmax(z)_c

The targets ``t`` are never materialized. The row kernel of ``kernels/token_targets.py`` rebuilds
each row's sparse target (at most ``S * 4 * k`` touched classes, every other class sharing one value)
and meets the logits row there:

forward, per row with weight ``w`` (cls_weight / B or dense_weight / (B * T)) and ``sum_c t_c = 1``::

    CE = lse(z) * sum_c t_c - sum_c t_c z_c = lse(z) - sum_c t_c z_c
    sum_c t_c z_c = keep * (e_rest * (sum_c z_c - sum_touched z_c) + sum_touched e_c z_c) + (s / K) * sum_c z_c

with ``e_c = exp(A_c - m)``, ``e_rest = exp(-m)``, ``keep = (1 - s) / Z`` — one pass over the logits
(for the logsumexp and the plain sum) plus a gather at the touched classes. Each row's weighted CE
and its logsumexp are stored; the loss is their sum.

backward::

    d(w * CE)/dz_c = w * (softmax(z)_c * sum_j t_j - t_c) = w * (exp(z_c - lse) - t_c)

written as one dense pass with the untouched target value, then (after a CTA barrier) the touched
classes are overwritten with their own target. The saved logsumexp avoids a second reduction; the
upstream gradient is read on the device (no ``.item()``, no host sync anywhere).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .token_targets import MODE_GRAD, MODE_LOSS, MixSpec, check_maps, launch_rows, mix_spec


@dataclass(frozen=True)
class LossSpec:
    """Everything about the loss that is not a tensor."""

    num_classes: int
    grid: tuple[int, int]
    smoothing: float
    cls_weight: float
    dense_weight: float
    mix: MixSpec
    programs: Optional[int] = None

    def row_weights(self, batch: int) -> tuple[float, float]:
        tokens = self.grid[0] * self.grid[1]
        return self.cls_weight / batch, self.dense_weight / (batch * tokens)


def _forward(cls_logits, token_logits, values, indices, affine, spec: LossSpec):
    bsz = cls_logits.shape[0]
    rows = torch.empty(bsz, 1 + spec.grid[0] * spec.grid[1], dtype=torch.float32, device=cls_logits.device)
    lse = torch.empty_like(rows)
    cls_w, tok_w = spec.row_weights(bsz)
    launch_rows(MODE_LOSS, values, indices, affine, num_classes=spec.num_classes, grid=spec.grid,
                smoothing=spec.smoothing, mix=spec.mix, cls_logits=cls_logits, token_logits=token_logits,
                row_loss=rows, lse=lse, cls_w=cls_w, tok_w=tok_w, programs=spec.programs)
    return rows.sum(), lse


def _backward(grad_out, cls_logits, token_logits, values, indices, affine, lse, spec: LossSpec):
    grad_cls = torch.empty_like(cls_logits)
    grad_tok = torch.empty_like(token_logits)
    cls_w, tok_w = spec.row_weights(cls_logits.shape[0])
    launch_rows(MODE_GRAD, values, indices, affine, num_classes=spec.num_classes, grid=spec.grid,
                smoothing=spec.smoothing, mix=spec.mix, cls_logits=cls_logits, token_logits=token_logits,
                grad_cls=grad_cls, grad_tok=grad_tok, lse=lse, grad_out=grad_out.to(torch.float32).contiguous(),
                cls_w=cls_w, tok_w=tok_w, programs=spec.programs)
    return grad_cls, grad_tok


class TokenLabelLossFunction(torch.autograd.Function):
    """Autograd wrapper: logits are differentiable, the label side is not."""

    @staticmethod
    def forward(ctx, cls_logits, token_logits, values, indices, affine, spec: LossSpec):
        loss, lse = _forward(cls_logits, token_logits, values, indices, affine, spec)
        ctx.save_for_backward(cls_logits, token_logits, values, indices, affine, lse)
        ctx.spec = spec
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        cls_logits, token_logits, values, indices, affine, lse = ctx.saved_tensors
        grad_cls, grad_tok = _backward(grad_out, cls_logits, token_logits, values, indices, affine, lse, ctx.spec)
        return grad_cls, grad_tok, None, None, None, None


def token_label_loss(
    cls_logits: torch.Tensor, token_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
    affine: torch.Tensor, *, num_classes: Optional[int] = None, grid: Optional[Sequence[int]] = None,
    smoothing: float = 0.0, mix_box=None, cls_weight: float = 1.0, dense_weight: float = 1.0,
    programs: Optional[int] = None,
) -> torch.Tensor:
    """The token-labeling loss (float32 scalar) from logits and compressed maps, fused.

    cls_logits [B, K], token_logits [B, T, K] or [B, Gh, Gw, K] (float32 / bfloat16 / float16);
    values / indices [B, k, H, W]; affine [B, 2, 3]; mix_box None, (r1, c1, r2, c2) or [B, 4].
    ``grid`` defaults to the 4-d logits' (Gh, Gw) or a square grid of T tokens.
    """
    if token_logits.dim() == 4:
        if grid is None:
            grid = (token_logits.shape[1], token_logits.shape[2])
        token_logits = token_logits.flatten(1, 2)
    if cls_logits.dim() != 2 or token_logits.dim() != 3 or token_logits.shape[0] != cls_logits.shape[0] \
            or token_logits.shape[2] != cls_logits.shape[1]:
        raise ValueError(f"expected cls_logits [B, K] and token_logits [B, T, K]; got {tuple(cls_logits.shape)} "
                         f"and {tuple(token_logits.shape)}")
    bsz, tokens, k_logits = token_logits.shape
    num_classes = k_logits if num_classes is None else int(num_classes)
    if num_classes != k_logits:
        raise ValueError(f"num_classes={num_classes} but the logits have {k_logits} classes")
    if grid is None:
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise ValueError(f"{tokens} tokens is not a square grid; pass grid=(Gh, Gw)")
        grid = (side, side)
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] * grid[1] != tokens:
        raise ValueError(f"grid {grid} has {grid[0] * grid[1]} tokens but token_logits has {tokens}")
    check_maps(values, indices, affine, num_classes)
    if values.shape[0] != bsz:
        raise ValueError(f"maps have batch {values.shape[0]} but logits have batch {bsz}")
    if cls_logits.device != values.device or token_logits.device != values.device:
        raise ValueError("logits and maps must be on one device")
    spec = LossSpec(num_classes, grid, float(smoothing), float(cls_weight), float(dense_weight),
                    mix_spec(mix_box, bsz, values.device), programs)
    return TokenLabelLossFunction.apply(cls_logits.contiguous(), token_logits.contiguous(), values.contiguous(),
                                        indices.contiguous(), affine.contiguous(), spec)


__all__ = ["token_label_loss", "TokenLabelLossFunction", "LossSpec"]
