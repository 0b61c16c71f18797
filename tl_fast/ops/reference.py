"""Pure PyTorch token targets and loss: the definition every fast path is tested against.

docs/spec.md section 3 in code. Nothing here builds the dense ``[B, K, H, W]`` map: every RoI-Align sample
of every token is expanded to its four bilinear corners, each corner to its ``k`` (score, class)
pairs, so a token is a short sparse row of ``S * 4 * k`` weighted scores. Those rows are
scatter-added into cache-sized dense blocks, soft-maxed and written once: ``B * (1 + T) * S * 4 * k``
additions instead of ``B * K * H * W`` writes plus two dense RoI-Aligns. Runs on CPU or GPU, all
batch-wide tensor operations (the only loop walks cache blocks, not samples).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..memory import new_output

# A token's sample count is ceil(extent); extents that are integers up to float noise must not
# round up to an extra sample. RoI-Align computes extents in float32; this tolerance absorbs that.
EXTENT_EPS = 1e-4


def widened_affine(affine: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
    """RoI-Align's ``aligned=False`` edge rule: an output region whose image is under one map pixel
    along an axis is widened to exactly one pixel, keeping its start edge (``u = 0`` / ``v = 0``)."""
    h, w = map_size
    a = affine.to(torch.float64).clone()
    scale = torch.tensor([w, h], dtype=torch.float64, device=a.device)
    for col in (0, 1):
        length = (a[:, :, col] * scale).norm(dim=1)  # extent of the whole output axis, map pixels
        a[:, :, col] = a[:, :, col] / length.clamp(max=1.0).clamp(min=1e-12)[:, None]
    return a


def sample_counts(affine: torch.Tensor, map_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Adaptive samples per token ``[B, 2]`` = (Sy, Sx), as RoI-Align's ``sampling_ratio=-1``.

    ``affine`` must already be widened (:func:`widened_affine`)."""
    h, w = map_size
    scale = torch.tensor([w, h], dtype=torch.float64, device=affine.device)
    ext_u = (affine[:, :, 0].double() * scale).norm(dim=1) / grid[1]
    ext_v = (affine[:, :, 1].double() * scale).norm(dim=1) / grid[0]
    sx = torch.ceil(ext_u - EXTENT_EPS).clamp(min=1)
    sy = torch.ceil(ext_v - EXTENT_EPS).clamp(min=1)
    return torch.stack([sy, sx], 1).long()


def _bilinear_corners(px: torch.Tensor, py: torch.Tensor, h: int, w: int):
    """RoI-Align's bilinear rule: 4 corner pixel ids and weights for each sample (``[..., 4]``)."""
    valid = ~((py < -1.0) | (py > h) | (px < -1.0) | (px > w))
    y = py.clamp(min=0)
    x = px.clamp(min=0)
    y_low = y.floor().long()
    x_low = x.floor().long()
    y_edge = y_low >= h - 1
    x_edge = x_low >= w - 1
    y_low = torch.where(y_edge, torch.full_like(y_low, h - 1), y_low)
    x_low = torch.where(x_edge, torch.full_like(x_low, w - 1), x_low)
    y = torch.where(y_edge, y_low.to(y.dtype), y)
    x = torch.where(x_edge, x_low.to(x.dtype), x)
    y_high = torch.where(y_edge, y_low, y_low + 1)
    x_high = torch.where(x_edge, x_low, x_low + 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    pix = torch.stack([y_low * w + x_low, y_low * w + x_high, y_high * w + x_low, y_high * w + x_high], -1)
    wgt = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], -1) * valid.unsqueeze(-1)
    return pix, wgt


def _region_samples(affine: torch.Tensor, map_size: tuple[int, int], grid: tuple[int, int]):
    """Every RoI-Align sample of every bin of a ``grid`` over the output: ``(pix, wgt)`` of shape
    ``[B, Gh*Gw, S*4]`` with weights already divided by the bin's sample count (padding has 0)."""
    h, w = map_size
    gh, gw = grid
    bsz = affine.shape[0]
    a = widened_affine(affine, map_size)
    counts = sample_counts(a, map_size, grid)  # [B, 2]
    sy_max, sx_max = int(counts[:, 0].max()), int(counts[:, 1].max())
    dev, f64 = a.device, torch.float64
    sy = counts[:, 0].to(f64).view(bsz, 1, 1, 1, 1)
    sx = counts[:, 1].to(f64).view(bsz, 1, 1, 1, 1)
    r = torch.arange(gh, device=dev, dtype=f64).view(1, gh, 1, 1, 1)
    c = torch.arange(gw, device=dev, dtype=f64).view(1, 1, gw, 1, 1)
    j = torch.arange(sy_max, device=dev, dtype=f64).view(1, 1, 1, sy_max, 1)
    i = torch.arange(sx_max, device=dev, dtype=f64).view(1, 1, 1, 1, sx_max)
    v = (r + (j + 0.5) / sy) / gh
    u = (c + (i + 0.5) / sx) / gw
    u, v = torch.broadcast_tensors(u, v)  # [B, Gh, Gw, Sy, Sx]
    x = a[:, 0, 0].view(-1, 1, 1, 1, 1) * u + a[:, 0, 1].view(-1, 1, 1, 1, 1) * v + a[:, 0, 2].view(-1, 1, 1, 1, 1)
    y = a[:, 1, 0].view(-1, 1, 1, 1, 1) * u + a[:, 1, 1].view(-1, 1, 1, 1, 1) * v + a[:, 1, 2].view(-1, 1, 1, 1, 1)
    pix, wgt = _bilinear_corners(x * w - 0.5, y * h - 0.5, h, w)  # [B, Gh, Gw, Sy, Sx, 4]
    inside = (j < sy) & (i < sx)  # padding samples beyond this sample's own counts
    wgt = wgt * inside.unsqueeze(-1) / (sy * sx).unsqueeze(-1)
    return pix.reshape(bsz, gh * gw, -1), wgt.reshape(bsz, gh * gw, -1)


def region_contributions(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse scores of each bin of a ``grid`` over the output: ``(classes, scores)``, both
    ``[B, Gh*Gw, N]`` (int64, float32); a bin's dense score vector is the sum of its ``scores`` at
    its ``classes`` (duplicates add up; padding entries score 0)."""
    bsz, k, h, w = values.shape
    pix, wgt = _region_samples(affine, (h, w), grid)  # [B, R, S*4]
    rows, n = pix.shape[1], pix.shape[2]
    # Entry (sample corner, j) reads element j * H*W + pixel of the flattened [k, H, W] map.
    flat = (pix.unsqueeze(-1) + torch.arange(k, device=pix.device) * (h * w)).view(bsz, rows * n * k)
    vals = torch.gather(values.reshape(bsz, k * h * w).to(torch.float32), 1, flat).view(bsz, rows, n, k)
    ids = torch.gather(indices.reshape(bsz, k * h * w).long(), 1, flat).view(bsz, rows, n * k)
    vals = vals * wgt.to(torch.float32).unsqueeze(-1)
    return ids, vals.view(bsz, rows, n * k)


def token_scores(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: tuple[int, int] = (14, 14),
) -> torch.Tensor:
    """RoI-Aligned dense scores ``[B, 1 + Gh*Gw, K]`` (float32) before the softmax.

    Row 0 pools the whole output with one bin (the class token), rows ``1..`` are the tokens."""
    parts = []
    for g in ((1, 1), tuple(grid)):
        ids, vals = region_contributions(values, indices, affine, g)
        dense = torch.zeros(ids.shape[0], ids.shape[1], num_classes, dtype=torch.float64, device=values.device)
        parts.append(dense.scatter_add_(2, ids, vals.double()))
    return torch.cat(parts, 1).to(torch.float32)


def mix_box_mask(mix_box, batch: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """Boolean ``[B, Gh, Gw]``: True inside each sample's MixToken box (rows ``[r1, r2)``, columns
    ``[c1, c2)``). ``mix_box`` is ``(r1, c1, r2, c2)`` for the whole batch or ``[B, 4]`` per sample.
    The model mixes its tokens and the ops mix their targets with this one mask."""
    box = mix_boxes(mix_box, batch, device)
    r = torch.arange(grid[0], device=box.device).view(1, -1, 1)
    c = torch.arange(grid[1], device=box.device).view(1, 1, -1)
    r1, c1, r2, c2 = (box[:, i].view(-1, 1, 1) for i in range(4))
    return (r >= r1) & (r < r2) & (c >= c1) & (c < c2)


def mix_boxes(mix_box, batch: int, device=None) -> torch.Tensor:
    """``[B, 4]`` int64 boxes ``(r1, c1, r2, c2)`` from one box for the batch or one per sample."""
    box = torch.as_tensor(mix_box, device=device).long()
    if box.dim() == 1:
        box = box.view(1, 4).expand(batch, 4)
    if box.shape != (batch, 4):
        raise ValueError(f"mix_box must be (r1, c1, r2, c2) or [B, 4]; got shape {tuple(box.shape)} for B={batch}")
    return box


def apply_mixtoken(targets: torch.Tensor, mix_box, grid: tuple[int, int]) -> torch.Tensor:
    """MixToken on targets ``[B, 1 + T, K]``: tokens in the box come from the partner ``B-1-b``, the
    class target becomes ``lam * own + (1 - lam) * partner`` with ``lam = 1 - area / T``."""
    bsz = targets.shape[0]
    gh, gw = grid
    inside = mix_box_mask(mix_box, bsz, grid, targets.device)
    inside = inside.reshape(bsz, gh * gw, 1)
    partner = targets.flip(0)
    tokens = torch.where(inside, partner[:, 1:], targets[:, 1:])
    lam = 1.0 - inside.sum(dim=(1, 2)).to(targets.dtype) / float(gh * gw)
    cls = lam[:, None] * targets[:, 0] + (1 - lam[:, None]) * partner[:, 0]
    return torch.cat([cls[:, None], tokens], 1)


def token_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Token targets ``[B, 1 + Gh*Gw, K]`` from top-k maps and per-sample affines (docs/spec.md section 3).

    values  [B, k, H, W] scores (float16 in storage); indices [B, k, H, W] class ids in [0, K)
    affine  [B, 2, 3] normalized output -> source map (:mod:`tl_fast.geometry`)
    mix_box ``(r1, c1, r2, c2)`` for the batch, ``[B, 4]`` per sample, or ``None``
    """
    grid = (int(grid[0]), int(grid[1]))
    check_inputs(values, indices, affine, num_classes)
    bsz, tokens = values.shape[0], grid[0] * grid[1]
    keep, spread = 1.0 - smoothing, smoothing / num_classes

    cls = _class_rows(values, indices, affine, num_classes, smoothing, mix_box, grid)  # row 0, float64
    ids, scores = region_contributions(values, indices, affine, grid)  # [B, T, N] sparse token rows
    inside = None
    if mix_box is not None:  # MixToken: tokens inside the box take the partner's (sparse) rows
        inside = mix_box_mask(mix_box, bsz, grid, values.device).view(bsz, tokens, 1)

    out = new_output((bsz, 1 + tokens, num_classes), out_dtype, values.device)
    out[:, 0] = cls
    # Densify, softmax and write a few samples at a time: the scratch rows stay in cache, so the
    # [B, T, K] output is written once instead of zeroed, accumulated, read and rewritten.
    step = max(1, _CHUNK_ROWS // tokens)
    scratch = torch.zeros(step, tokens, num_classes, dtype=torch.float32, device=values.device)
    for b0 in range(0, bsz, step):
        b1 = min(b0 + step, bsz)
        rows_ids, rows_scores = ids[b0:b1], scores[b0:b1]
        if inside is not None:
            rows_ids = torch.where(inside[b0:b1], ids[bsz - b1:bsz - b0].flip(0), rows_ids)
            rows_scores = torch.where(inside[b0:b1], scores[bsz - b1:bsz - b0].flip(0), rows_scores)
        dense = scratch[: b1 - b0].zero_()
        dense.scatter_add_(2, rows_ids, rows_scores)
        block = out[b0:b1, 1:]
        t = torch.softmax(dense, -1, out=block) if out_dtype == torch.float32 else dense.softmax(-1)
        if smoothing:
            t.mul_(keep).add_(spread)
        if t is not block:
            block.copy_(t)
    return out


_CHUNK_ROWS = 256  # rows of K floats per scratch block (about 1 MB for K = 1000)
def _class_token_scores(values, indices, affine, num_classes: int) -> torch.Tensor:
    """Dense ``[B, K]`` class-token scores (one bin over the whole output), float64."""
    ids, vals = region_contributions(values, indices, affine, (1, 1))
    dense = torch.zeros(values.shape[0], num_classes, dtype=torch.float64, device=values.device)
    return dense.scatter_add_(1, ids[:, 0], vals[:, 0].double())


def _class_rows(values, indices, affine, num_classes: int, smoothing: float, mix_box,
                grid: tuple[int, int], smoothing_rule: str = "tl_fast") -> torch.Tensor:
    """Class-token targets ``[B, K]`` in float64: softmax of the pooled crop, smoothed, then mixed
    by the MixToken box's area (``lam * t[b] + (1 - lam) * t[B - 1 - b]``)."""
    from ..compat import smoothing_terms

    keep, spread = smoothing_terms(smoothing, num_classes, smoothing_rule)
    cls = _class_token_scores(values, indices, affine, num_classes).softmax(-1) * keep + spread
    return mix_class_rows(cls, mix_box, grid)


def mix_class_rows(cls: torch.Tensor, mix_box, grid: tuple[int, int]) -> torch.Tensor:
    """MixToken on class targets ``[B, K]``: ``lam * t[b] + (1 - lam) * t[B - 1 - b]`` with ``lam = 1 -
    area / (Gh * Gw)`` of each sample's box (``cls`` itself when ``mix_box`` is None)."""
    if mix_box is None:
        return cls
    inside = mix_box_mask(mix_box, cls.shape[0], grid, cls.device)
    lam = (1.0 - inside.sum((1, 2)).to(cls.dtype) / (grid[0] * grid[1])).unsqueeze(1)
    return lam * cls + (1.0 - lam) * cls.flip(0)


def class_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    smoothing: float = 0.0, mix_box=None, grid: Sequence[int] = (14, 14), out_dtype: torch.dtype = torch.float32,
    smoothing_rule: str = "tl_fast",
) -> torch.Tensor:
    """Class-token targets ``[B, K]`` only: row 0 of :func:`token_targets`, without computing the
    token rows (the class-token-only mode: ReLabel's LabelPooling, the official
    ``--token-label-size 1``). ``grid`` only sets the MixToken box's units (``lam = 1 - area / T``);
    ``smoothing_rule="official"`` smooths as the official code (:mod:`tl_fast.compat`)."""
    grid = (int(grid[0]), int(grid[1]))
    check_inputs(values, indices, affine, num_classes)
    return _class_rows(values, indices, affine, num_classes, smoothing, mix_box, grid, smoothing_rule).to(out_dtype)


def class_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch mean of the soft-target cross-entropy of ``logits [B, K]`` against ``targets [B, K]``."""
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits and targets must both be [B, K]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    return soft_cross_entropy(logits, targets).mean()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``-sum_c t_c log softmax(z)_c`` per row, in float32."""
    return -(target.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def token_label_loss(
    cls_logits: torch.Tensor, token_logits: torch.Tensor, targets: torch.Tensor, *,
    cls_weight: float = 1.0, dense_weight: float = 1.0,
) -> torch.Tensor:
    """``cls_weight * CE(cls) + dense_weight * mean over tokens CE(token)`` (batch means)."""
    if token_logits.dim() == 4:  # [B, Gh, Gw, K]
        token_logits = token_logits.flatten(1, 2)
    if targets.shape[1] != 1 + token_logits.shape[1]:
        raise ValueError(f"targets have {targets.shape[1]} rows; expected 1 + {token_logits.shape[1]} tokens")
    cls = soft_cross_entropy(cls_logits, targets[:, 0]).mean()
    dense = soft_cross_entropy(token_logits, targets[:, 1:]).mean()
    return cls_weight * cls + dense_weight * dense


def check_inputs(values, indices, affine, num_classes: int, *, ids: bool = True) -> None:
    """Shapes, and (``ids``) that every class id lies in ``[0, K)``; a ValueError that says what is wrong."""
    if values.dim() != 4 or indices.shape != values.shape:
        raise ValueError(f"values and indices must both be [B, k, H, W]; got {tuple(values.shape)} and {tuple(indices.shape)}")
    if affine.shape != (values.shape[0], 2, 3):
        raise ValueError(f"affine must be [B, 2, 3] = [{values.shape[0]}, 2, 3]; got {tuple(affine.shape)}")
    if num_classes <= 0 or math.prod(values.shape) == 0:
        raise ValueError("num_classes must be positive and maps non-empty")
    if not ids:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"class ids must lie in [0, {num_classes}); found range [{lo}, {hi}]")
