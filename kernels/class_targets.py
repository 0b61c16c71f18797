"""Class-token targets ``[B, K]`` and their soft-target cross-entropy from compressed top-k maps.

The class-token-only mode (ReLabel's LabelPooling, the official TokenLabeling ``--token-label-size 1``)
supervises a classifier's logits with one target per sample: the softmax of the whole crop pooled
into one RoI-Align bin, label-smoothed, and mixed by the MixToken box's area when there is one::

    t[b] = lam_b * p[b] + (1 - lam_b) * p[B - 1 - b],  p[b] = keep * softmax(a[b]) + spread
    lam_b = 1 - area(box_b) / (Gh * Gw)

Semantics: ``tl_fast.ops.reference.class_targets`` (SPEC section 3); ``keep = 1 - s`` and
``spread = s / K`` there (``smoothing_rule="official"``: ``tl_fast.compat.smoothing_terms``).

One program per sample: the sample's sparse list of ``Sy * Sx * 4 * k`` (sample, corner, top-k
entry) scores (and its partner's, under MixToken) is atomically added into a float32 scratch row of
``K``, then a dense pass over ``K`` writes the target row (MODE 0), or meets
the logits row (MODE 1: loss, MODE 2: gradient) so the fused loss writes no targets at all.

Loss, per row with weight ``w = 1 / B``::

    CE = sum_c t_c * (lse(z) - z_c)                       (MODE 1; stores lse and sum_c t_c)
    d(w * CE)/dz_c = w * (softmax(z)_c * sum_j t_j - t_c)  (MODE 2; times the upstream gradient)

``sum_j t_j`` is 1 up to rounding with the default smoothing, but is kept general.

Geometry (widening, adaptive sample counts, sample positions, bilinear weights) is evaluated in
float64 as the reference does; scores accumulate in float32. Class ids outside ``[0, K)`` poison
their row with NaN (never an out-of-bounds write). No host synchronization anywhere.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ..compat import smoothing_terms  # (keep, spread) of the tl_fast or the official smoothing

# Must equal tl_fast.ops.reference.EXTENT_EPS: sample counts are ceil(extent - EXTENT_EPS).
EXTENT_EPS = 1e-4
MAX_SAMPLES_PER_AXIS = 1024  # an affine blowing the crop up past this is not an augmentation
CHUNK = 512  # lanes per accumulation step (a 15x15 top-5 map's whole crop is at most 4,500 lanes)
NUM_WARPS = 4

MODE_TARGETS, MODE_LOSS, MODE_GRAD = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------

@triton.jit
def _pool_crop(scr, values_ptr, indices_ptr, affine_ptr, s, H, W, K, Hf, Wf,
               KTOP: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr, CHUNK: tl.constexpr):
    """Atomically add sample ``s``'s one-bin RoI-Align scores into the float32 row ``scr[0:K]``;
    returns the number of entries whose class id lies outside ``[0, K)``.

    values_ptr, indices_ptr: [B, KTOP, H, W]; affine_ptr: [B, 2, 3] normalized output -> source.
    """
    p = affine_ptr + s.to(tl.int64) * 6
    a00 = tl.load(p).to(tl.float64)
    a01 = tl.load(p + 1).to(tl.float64)
    a02 = tl.load(p + 2).to(tl.float64)
    a10 = tl.load(p + 3).to(tl.float64)
    a11 = tl.load(p + 4).to(tl.float64)
    a12 = tl.load(p + 5).to(tl.float64)
    h = tl.cast(Hf, tl.float64)
    w = tl.cast(Wf, tl.float64)
    # RoI-Align's aligned=False rule: an output axis whose image is under one map pixel is widened
    # to exactly one pixel, start edge kept. After it, the extents are the sample counts' basis.
    len_u = tl.sqrt((a00 * w) * (a00 * w) + (a10 * h) * (a10 * h))
    len_v = tl.sqrt((a01 * w) * (a01 * w) + (a11 * h) * (a11 * h))
    du = tl.maximum(tl.minimum(len_u, 1.0), 1e-12)
    dv = tl.maximum(tl.minimum(len_v, 1.0), 1e-12)
    a00 = a00 / du
    a10 = a10 / du
    a01 = a01 / dv
    a11 = a11 / dv
    ext_u = tl.minimum(tl.maximum(len_u / du - EPS, 0.0), MAX_S)
    ext_v = tl.minimum(tl.maximum(len_v / dv - EPS, 0.0), MAX_S)
    sx = ext_u.to(tl.int32)  # floor (ext >= 0), then ceil, at least 1
    sy = ext_v.to(tl.int32)
    sx = tl.maximum(tl.where(sx.to(tl.float64) < ext_u, sx + 1, sx), 1)
    sy = tl.maximum(tl.where(sy.to(tl.float64) < ext_v, sy + 1, sy), 1)
    inv_sx = 1.0 / sx.to(tl.float64)
    inv_sy = 1.0 / sy.to(tl.float64)
    n_lanes = sy * sx * (4 * KTOP)
    n_bad = 0
    for g0 in range(0, n_lanes, CHUNK):
        # Lane g = ((q * 4) + corner) * KTOP + j: sample q = iy * Sx + ix, bilinear corner, top-k entry j.
        g = g0 + tl.arange(0, CHUNK)
        live = g < n_lanes
        g = tl.where(live, g, 0)
        j = g % KTOP
        corner = (g // KTOP) % 4
        q = g // (4 * KTOP)
        iy = q // sx
        ix = q % sx
        u = (ix.to(tl.float64) + 0.5) * inv_sx
        v = (iy.to(tl.float64) + 0.5) * inv_sy
        px = (a00 * u + a01 * v + a02) * w - 0.5
        py = (a10 * u + a11 * v + a12) * h - 0.5
        inside = (py >= -1.0) & (py <= h) & (px >= -1.0) & (px <= w)
        # Bilinear rule: clamp at 0 and snap to the last row / column at the far edge (the upper
        # clamp only moves samples that are outside anyway, keeping the int conversion in range).
        yy = tl.minimum(tl.maximum(py, 0.0), h)
        xx = tl.minimum(tl.maximum(px, 0.0), w)
        y_lo = yy.to(tl.int32)
        x_lo = xx.to(tl.int32)
        y_edge = y_lo >= H - 1
        x_edge = x_lo >= W - 1
        y_lo = tl.where(y_edge, H - 1, y_lo)
        x_lo = tl.where(x_edge, W - 1, x_lo)
        yy = tl.where(y_edge, y_lo.to(tl.float64), yy)
        xx = tl.where(x_edge, x_lo.to(tl.float64), xx)
        ly = yy - y_lo.to(tl.float64)
        lx = xx - x_lo.to(tl.float64)
        lower = corner >= 2
        right = (corner % 2) == 1
        cy = tl.where(lower & ~y_edge, y_lo + 1, y_lo)
        cx = tl.where(right & ~x_edge, x_lo + 1, x_lo)
        wgt = tl.where(lower, ly, 1.0 - ly) * tl.where(right, lx, 1.0 - lx)
        wgt = tl.where(inside, wgt, 0.0) * (inv_sy * inv_sx)
        off = s.to(tl.int64) * (KTOP * H * W) + j * (H * W) + cy * W + cx
        val = tl.load(values_ptr + off, mask=live, other=0.0).to(tl.float32)
        cls = tl.load(indices_ptr + off, mask=live, other=0).to(tl.int32)
        ok = live & (cls >= 0) & (cls < K)
        n_bad += tl.sum((live & ~ok).to(tl.int32), axis=0)
        tl.atomic_add(scr + cls, wgt.to(tl.float32) * val, mask=ok, sem="relaxed")
    return n_bad


@triton.jit
def _row_stats(scr, K, BLOCK_K: tl.constexpr):
    """(max, sum exp(x - max)) of the scratch row scr[0:K] (read past L1: atomics built it)."""
    m = float("-inf")
    acc = 0.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(scr + offs, mask=offs < K, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(x, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    return m, acc


@triton.jit
def _class_rows_kernel(
    values_ptr,    # [B, KTOP, H, W] float16/float32 scores
    indices_ptr,   # [B, KTOP, H, W] int16/int32/int64 class ids
    affine_ptr,    # [B, 2, 3] float32/float64, normalized output -> source
    box_ptr,       # MIX: [B, 4] (box_stride 4) or [4] (box_stride 0) int (r1, c1, r2, c2), token units
    box_stride,
    out_ptr,       # MODE 0: [B, K] targets
    z_ptr,         # MODE 1/2: [B, K] logits (contiguous)
    g_ptr,         # MODE 2: [B, K] gradient of the logits
    loss_ptr,      # MODE 1: [B] weighted cross-entropy of each row
    stats_ptr,     # MODE 1 writes, MODE 2 reads: [B, 2] (logsumexp of z, sum of t) per row
    gout_ptr,      # MODE 2: [] upstream gradient
    scratch_ptr,   # [B, 2, K] float32, uninitialized (zeroed here)
    B, K, H, W, GH, GW, Hf, Wf, Tf, keep, spread, row_w,  # Hf, Wf, Tf: H, W, Gh * Gw as floats
    KTOP: tl.constexpr, MODE: tl.constexpr, MIX: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    partner = B - 1 - b
    scr = scratch_ptr + b * (2 * K)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        tl.store(scr + offs, tl.zeros([BLOCK_K], tl.float32), mask=offs < K)
        if MIX:
            tl.store(scr + K + offs, tl.zeros([BLOCK_K], tl.float32), mask=offs < K)
    tl.debug_barrier()  # the zeros must land before the atomics add to them
    n_bad = _pool_crop(scr, values_ptr, indices_ptr, affine_ptr, b, H, W, K, Hf, Wf, KTOP, EPS, MAX_S, CHUNK)
    lam = 1.0
    if MIX:
        n_bad += _pool_crop(scr + K, values_ptr, indices_ptr, affine_ptr, partner, H, W, K, Hf, Wf, KTOP, EPS,
                            MAX_S, CHUNK)
        bp = box_ptr + b * box_stride
        r1 = tl.load(bp).to(tl.int32)
        c1 = tl.load(bp + 1).to(tl.int32)
        r2 = tl.load(bp + 2).to(tl.int32)
        c2 = tl.load(bp + 3).to(tl.int32)
        area = tl.maximum(tl.minimum(r2, GH) - tl.maximum(r1, 0), 0) * \
            tl.maximum(tl.minimum(c2, GW) - tl.maximum(c1, 0), 0)
        lam = 1.0 - area.to(tl.float32) / Tf
    tl.debug_barrier()  # every atomic has landed before the row is read
    m1, z1 = _row_stats(scr, K, BLOCK_K)
    keep1 = keep / tl.where(n_bad > 0, float("nan"), z1)
    m2 = m1
    keep2 = keep1
    if MIX:
        m2, z2 = _row_stats(scr + K, K, BLOCK_K)
        keep2 = keep / tl.where(n_bad > 0, float("nan"), z2)

    row = b * K
    lse = 0.0
    tsum = 0.0
    scale = 0.0
    if MODE == 1:  # logsumexp of the logits row, online over K
        mz = float("-inf")
        acc = 0.0
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            z = tl.load(z_ptr + row + offs, mask=offs < K, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(mz, tl.max(z, axis=0))
            acc = acc * tl.exp(mz - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            mz = m_new
        lse = mz + tl.log(acc)
    if MODE == 2:
        lse = tl.load(stats_ptr + 2 * b)
        tsum = tl.load(stats_ptr + 2 * b + 1)
        scale = tl.load(gout_ptr).to(tl.float32) * row_w
    ce = 0.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(scr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        t = tl.exp(x - m1) * keep1 + spread
        if MIX:
            x2 = tl.load(scr + K + offs, mask=mask, other=0.0, cache_modifier=".cg")
            t = lam * t + (1.0 - lam) * (tl.exp(x2 - m2) * keep2 + spread)
        if MODE == 0:
            tl.store(out_ptr + row + offs, t.to(out_ptr.dtype.element_ty), mask=mask)
        if MODE == 1:
            z = tl.load(z_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
            ce += tl.sum(tl.where(mask, t * (lse - z), 0.0), axis=0)
            tsum += tl.sum(tl.where(mask, t, 0.0), axis=0)
        if MODE == 2:
            z = tl.load(z_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
            grad = scale * (tl.exp(z - lse) * tsum - t)
            tl.store(g_ptr + row + offs, grad.to(g_ptr.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(loss_ptr + b, row_w * ce)
        tl.store(stats_ptr + 2 * b, lse)
        tl.store(stats_ptr + 2 * b + 1, tsum)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def box_argument(mix_box, batch: int, device: torch.device) -> tuple[Optional[torch.Tensor], int]:
    """``(int32 box tensor on device, stride)`` for None, ``(r1, c1, r2, c2)``, a ``[4]`` / ``[B, 4]``
    tensor or array, or a ``tl_fast.plan.MixBox``; ``(None, 0)`` without a box."""
    if mix_box is None:
        return None, 0
    if hasattr(mix_box, "boxes") and hasattr(mix_box, "lam"):  # tl_fast.plan.MixBox
        mix_box = mix_box.boxes
    box = mix_box if isinstance(mix_box, torch.Tensor) else torch.as_tensor(np.asarray(mix_box))
    if box.is_floating_point() or box.dtype == torch.bool:
        raise TypeError(f"mix_box must hold integers (token units); got {box.dtype}")
    box = box.to(device=device, dtype=torch.int32)
    if box.shape in ((4,), (1, 4)):
        return box.reshape(4).contiguous(), 0
    if box.shape != (batch, 4):
        raise ValueError(f"mix_box must be (r1, c1, r2, c2) or [B, 4]; got shape {tuple(box.shape)} for B={batch}")
    return box.contiguous(), 4


def check_maps(values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, num_classes: int) -> None:
    """Shape, dtype and device checks that need no device synchronization."""
    if values.dim() != 4 or indices.shape != values.shape:
        raise ValueError(f"values and indices must both be [B, k, H, W]; got {tuple(values.shape)} and "
                         f"{tuple(indices.shape)}")
    if affine.shape != (values.shape[0], 2, 3):
        raise ValueError(f"affine must be [B, 2, 3] = [{values.shape[0]}, 2, 3]; got {tuple(affine.shape)}")
    if num_classes <= 0 or values.numel() == 0:
        raise ValueError("num_classes must be positive and maps non-empty")
    if not values.is_floating_point() or indices.is_floating_point() or not affine.is_floating_point():
        raise TypeError(f"values and affine must be floating point and indices integer; got {values.dtype}, "
                        f"{indices.dtype}, {affine.dtype}")
    if not (values.device == indices.device == affine.device):
        raise ValueError(f"values, indices and affine must be on one device; got {values.device}, "
                         f"{indices.device}, {affine.device}")


def _launch(mode: int, values, indices, affine, *, num_classes: int, grid: tuple[int, int], keep: float,
            spread: float, mix_box, out=None, logits=None, grad=None, row_loss=None, stats=None,
            grad_out=None) -> None:
    bsz, topk, h, w = values.shape
    device = values.device
    scratch = torch.empty(bsz, 2, num_classes, dtype=torch.float32, device=device)
    box, box_stride = box_argument(mix_box, bsz, device)
    dummy = scratch
    _class_rows_kernel[(bsz,)](
        values.contiguous(), indices.contiguous(), affine.contiguous(), box if box is not None else dummy, box_stride,
        out if out is not None else dummy, logits if logits is not None else dummy,
        grad if grad is not None else dummy, row_loss if row_loss is not None else dummy,
        stats if stats is not None else dummy, grad_out if grad_out is not None else dummy, scratch,
        bsz, num_classes, h, w, int(grid[0]), int(grid[1]), float(h), float(w), float(grid[0] * grid[1]), float(keep), float(spread), 1.0 / bsz,
        KTOP=topk, MODE=mode, MIX=box is not None, BLOCK_K=min(triton.next_power_of_2(num_classes), 1024),
        CHUNK=CHUNK, EPS=EXTENT_EPS, MAX_S=float(MAX_SAMPLES_PER_AXIS), num_warps=NUM_WARPS,
    )


def class_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    smoothing: float = 0.0, mix_box=None, grid: Sequence[int] = (14, 14), out_dtype: torch.dtype = torch.float32,
    smoothing_rule: str = "tl_fast",
) -> torch.Tensor:
    """Class-token targets ``[B, K]`` (``out_dtype``) in one launch; only ``[B, K]`` is written.

    values [B, k, H, W]; indices [B, k, H, W]; affine [B, 2, 3]; mix_box None, ``(r1, c1, r2, c2)`` or
    ``[B, 4]`` in units of ``grid``. Semantics: ``tl_fast.ops.reference.class_targets``."""
    check_maps(values, indices, affine, num_classes)
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {out_dtype}")
    keep, spread = smoothing_terms(smoothing, num_classes, smoothing_rule)
    out = torch.empty(values.shape[0], num_classes, dtype=out_dtype, device=values.device)
    _launch(MODE_TARGETS, values, indices, affine, num_classes=num_classes, grid=tuple(grid), keep=keep,
            spread=spread, mix_box=mix_box, out=out)
    return out


class ClassTokenLossFunction(torch.autograd.Function):
    """Autograd wrapper of the fused loss: the logits are differentiable, the label side is not."""

    @staticmethod
    def forward(ctx, logits, values, indices, affine, box, opts: dict):
        bsz = logits.shape[0]
        rows = torch.empty(bsz, dtype=torch.float32, device=logits.device)
        stats = torch.empty(bsz, 2, dtype=torch.float32, device=logits.device)
        _launch(MODE_LOSS, values, indices, affine, mix_box=box, logits=logits, row_loss=rows, stats=stats, **opts)
        ctx.save_for_backward(logits, values, indices, affine, stats, *(() if box is None else (box,)))
        ctx.opts = opts
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        logits, values, indices, affine, stats, *box = ctx.saved_tensors
        grad = torch.empty_like(logits)
        _launch(MODE_GRAD, values, indices, affine, mix_box=box[0] if box else None, logits=logits, grad=grad,
                stats=stats, grad_out=grad_out.to(torch.float32).contiguous(), **ctx.opts)
        return grad, None, None, None, None, None


def class_token_loss(
    logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *,
    num_classes: Optional[int] = None, smoothing: float = 0.0, mix_box=None, grid: Sequence[int] = (14, 14),
    smoothing_rule: str = "tl_fast",
) -> torch.Tensor:
    """Batch mean of the soft-target cross-entropy of ``logits [B, K]`` (float32 / bfloat16 /
    float16) against the class-token targets, fused: the targets are never written."""
    if logits.dim() != 2 or logits.shape[0] != values.shape[0]:
        raise ValueError(f"logits must be [B, K] with B = {values.shape[0]}; got {tuple(logits.shape)}")
    num_classes = logits.shape[1] if num_classes is None else int(num_classes)
    if num_classes != logits.shape[1]:
        raise ValueError(f"num_classes={num_classes} but the logits have {logits.shape[1]} classes")
    check_maps(values, indices, affine, num_classes)
    if logits.device != values.device:
        raise ValueError(f"logits ({logits.device}) and maps ({values.device}) must be on one device")
    keep, spread = smoothing_terms(smoothing, num_classes, smoothing_rule)
    box, _ = box_argument(mix_box, logits.shape[0], values.device)
    opts = dict(num_classes=num_classes, grid=(int(grid[0]), int(grid[1])), keep=keep, spread=spread)
    return ClassTokenLossFunction.apply(logits.contiguous(), values.contiguous(), indices.contiguous(),
                                        affine.contiguous(), box, opts)


__all__ = ["class_targets", "class_token_loss", "ClassTokenLossFunction", "box_argument", "check_maps",
           "EXTENT_EPS"]
