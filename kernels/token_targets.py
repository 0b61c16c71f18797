"""Token targets from compressed top-k maps in one Triton launch (SPEC section 3).

Every output row (a sample's class token or one of its patch tokens) is a softmax over all ``K``
classes of RoI-Aligned scores. A token's scores are sparse: its ``Sy * Sx`` bilinear samples touch
four map pixels each, and every pixel carries ``k`` (class, score) pairs, so the row is a list of
``n = Sy * Sx * 4 * k`` weighted entries (80 for a 2x2-sample token of a top-5 map). The kernel never
builds the dense ``[B, K, H, W]`` map nor a dense score row; it works on that list.

Softmax over K with sparse scores. Let ``A_c`` be the summed score of each *distinct* touched class
(entries of one class anywhere in the list add up first), and ``U = K - #distinct`` the number of
untouched classes, whose score is exactly 0. Then::

    m = max(max_c A_c, 0 if U > 0)
    Z = sum_c exp(A_c - m) + U * exp(-m)
    t_c = (1 - s) * exp(A_c - m) / Z + s / K   (touched)     t_c = (1 - s) * exp(-m) / Z + s / K   (rest)

A touched class whose sum is 0 is indistinguishable from an untouched one, so counting it either way
gives the same row. Two ways to get the ``A_c``:

* fast path (tokens whose list fits 32 / 64 / 128 lanes): an all-pairs class comparison inside the
  program (``[n, n]`` in registers) gives every entry its class total and marks the first entry of
  each class; the row is then written as one dense store of the untouched value followed, after a
  CTA barrier, by a scatter of the touched values (duplicates write equal values).
* general path (the class token, which pools the whole crop, and tokens of large maps or small
  grids): the list is streamed in chunks and atomically added into a per-program float32 scratch
  row of ``K``, then the row is soft-maxed densely from the scratch (float32 atomics make this path's
  rounding order, not its value, run-dependent).

MixToken: the partner of sample ``b`` is ``B - 1 - b``. Row ``(b, token)`` inside ``b``'s box is
computed from the partner's map and geometry (its clean target); the class row is
``lam * own + (1 - lam) * partner`` from both samples' class scores, ``lam = 1 - area / T``.

The same row machinery serves the fused loss (``kernels/token_label_loss.py``): ``MODE`` selects
whether a row's targets are written (0), dotted with a logits row into a cross-entropy value (1), or
turned into the gradient ``softmax(z) - t`` (2), so the loss never materializes targets either.

Geometry (widening, adaptive sample counts, sample positions, bilinear weights) is evaluated in
float64 exactly as ``tl_fast.ops.reference``; scores accumulate in float32. Class ids outside
``[0, K)`` poison their row with NaN (never an out-of-bounds write).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

# Must equal tl_fast.ops.reference.EXTENT_EPS: sample counts are ceil(extent - EXTENT_EPS).
EXTENT_EPS = 1e-4
# Sample counts are capped per axis (an affine that blows a token up to > 1024 map pixels is not an
# augmentation); it keeps lane indices inside int32.
MAX_SAMPLES_PER_AXIS = 1024

# Launch shape, from the sweep on an H100 (``benchmarks/kernel_throughput.py --sweep``, BENCHMARKS.md):
# 2 warps beat 1, 4 and 8 (0.36 vs 0.47, 0.44, 1.09 ms for B=128, K=1000), and more than 4 programs
# per SM change nothing (ptxas: 168 registers per thread at 2 warps, so about 6 programs are resident;
# rows come from an atomic counter, so extra programs only wait). Both can be overridden
# (TL_FAST_KERNEL_WARPS, TL_FAST_PROGRAMS_PER_SM); they never change the results.
NUM_WARPS = int(os.environ.get("TL_FAST_KERNEL_WARPS", "2"))
PROGRAMS_PER_SM = int(os.environ.get("TL_FAST_PROGRAMS_PER_SM", "4"))
CHUNK = 512  # general-path lanes per step (the class row has Sy * Sx * 4 * k lanes, ~3k at 224 px)
PAIR_BLOCK = 16  # fast path: other-lane chunk of the all-pairs comparison

MODE_TARGETS, MODE_LOSS, MODE_GRAD = 0, 1, 2
MIX_NONE, MIX_SCALAR, MIX_TENSOR = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------

@triton.jit
def _geometry(affine_ptr, s, Hf, Wf, GHf, GWf, EPS: tl.constexpr, MAX_S: tl.constexpr):
    """Sample ``s``'s widened affine (float64), its adaptive sample counts for a GH x GW grid, and
    the reciprocals of the counts and of the grid.

    affine_ptr: [B, 2, 3]. RoI-Align's ``aligned=False`` rule widens an output axis whose image is
    under one map pixel to exactly one pixel (start edge kept); counts are ceil(extent - EPS) >= 1.
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
    len_u = tl.sqrt((a00 * w) * (a00 * w) + (a10 * h) * (a10 * h))
    len_v = tl.sqrt((a01 * w) * (a01 * w) + (a11 * h) * (a11 * h))
    du = tl.maximum(tl.minimum(len_u, 1.0), 1e-12)
    dv = tl.maximum(tl.minimum(len_v, 1.0), 1e-12)
    a00 = a00 / du
    a10 = a10 / du
    a01 = a01 / dv
    a11 = a11 / dv
    ext_u = tl.sqrt((a00 * w) * (a00 * w) + (a10 * h) * (a10 * h)) / tl.cast(GWf, tl.float64) - EPS
    ext_v = tl.sqrt((a01 * w) * (a01 * w) + (a11 * h) * (a11 * h)) / tl.cast(GHf, tl.float64) - EPS
    ext_u = tl.minimum(tl.maximum(ext_u, 0.0), MAX_S)
    ext_v = tl.minimum(tl.maximum(ext_v, 0.0), MAX_S)
    sx = ext_u.to(tl.int32)  # trunc == floor for ext >= 0; then ceil
    sy = ext_v.to(tl.int32)
    sx = tl.maximum(tl.where(sx.to(tl.float64) < ext_u, sx + 1, sx), 1)
    sy = tl.maximum(tl.where(sy.to(tl.float64) < ext_v, sy + 1, sy), 1)
    # Reciprocals for the per-lane sample positions (per-lane float64 divisions would dominate; they
    # differ from the reference's divisions by an ulp of float64, far below the float32 output).
    inv_sy = 1.0 / sy.to(tl.float64)
    inv_sx = 1.0 / sx.to(tl.float64)
    inv_gh = 1.0 / tl.cast(GHf, tl.float64)
    inv_gw = 1.0 / tl.cast(GWf, tl.float64)
    return a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw


@triton.jit
def _lanes(values_ptr, indices_ptr, s, g, r, c, H, W, K, Hf, Wf, GHf, GWf,
           a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP: tl.constexpr):
    """Entries ``g`` (a 1-D block of lane ids) of bin ``(r, c)``'s sparse row of sample ``s``, whose
    geometry (:func:`_geometry`) the caller computed once for the row: the float64 square roots and
    divisions there cost more than the lanes themselves when repeated per chunk.

    values_ptr, indices_ptr: [B, KTOP, H, W]. Lane g is (sample q, corner, j) with
    g = ((q * 4) + corner) * KTOP + j, q = iy * Sx + ix. Returns (class, score, ok, bad): ok marks
    live lanes with a valid class, bad live lanes whose class is outside [0, K).
    """
    live = g < sy * sx * (4 * KTOP)
    g = tl.where(live, g, 0)
    j = g % KTOP
    p = g // KTOP
    q = p // 4
    corner = p % 4
    iy = q // sx
    ix = q % sx
    h = tl.cast(Hf, tl.float64)
    w = tl.cast(Wf, tl.float64)
    v = (tl.cast(r, tl.float64) + (iy.to(tl.float64) + 0.5) * inv_sy) * inv_gh
    u = (tl.cast(c, tl.float64) + (ix.to(tl.float64) + 0.5) * inv_sx) * inv_gw
    px = (a00 * u + a01 * v + a02) * w - 0.5
    py = (a10 * u + a11 * v + a12) * h - 0.5
    inside = (py >= -1.0) & (py <= h) & (px >= -1.0) & (px <= w)
    # RoI-Align's bilinear rule: clamp at 0, snap to the last row/column at the far edge. The upper
    # clamp only touches samples already outside (py > H), and keeps the int conversion in range.
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
    y_hi = tl.where(y_edge, y_lo, y_lo + 1)
    x_hi = tl.where(x_edge, x_lo, x_lo + 1)
    ly = yy - y_lo.to(tl.float64)
    lx = xx - x_lo.to(tl.float64)
    lower = corner >= 2
    right = (corner % 2) == 1
    cy = tl.where(lower, y_hi, y_lo)
    cx = tl.where(right, x_hi, x_lo)
    wgt = tl.where(lower, ly, 1.0 - ly) * tl.where(right, lx, 1.0 - lx)
    wgt = tl.where(inside, wgt, 0.0) * (inv_sy * inv_sx)
    off = s.to(tl.int64) * (KTOP * H * W) + j * (H * W) + cy * W + cx
    val = tl.load(values_ptr + off, mask=live, other=0.0).to(tl.float32)
    cls = tl.load(indices_ptr + off, mask=live, other=0).to(tl.int32)
    bad = live & ((cls < 0) | (cls >= K))
    ok = live & ((cls >= 0) & (cls < K))
    score = tl.where(ok, wgt.to(tl.float32) * val, 0.0)
    cls = tl.where(ok, cls, -1)
    return cls, score, ok, bad


@triton.jit
def _logsumexp(z_row, K, BLOCK_K: tl.constexpr):
    """(logsumexp, sum) of a logits row z_row[0:K], in float32, online over K blocks."""
    m = float("-inf")
    acc = 0.0
    zsum = 0.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        m = m_new
    return m + tl.log(acc), zsum


@triton.jit
def _fast_row(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf, GHf, GWf, Kf, smoothing,
              a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw,
              out_row, z_row, g_row, loss_slot, lse_slot, row_w, gout_ptr,
              KTOP: tl.constexpr, MODE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CB: tl.constexpr):
    """One row whose sparse list fits BLOCK_N lanes: class totals by all-pairs comparison."""
    lane = tl.arange(0, BLOCK_N)
    cls, score, ok, bad = _lanes(values_ptr, indices_ptr, s, lane, r, c, H, W, K, Hf, Wf, GHf, GWf,
                                 a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP)
    # All pairs, against OTHER lanes in chunks of CB (recomputed: cheaper than holding a
    # [BLOCK_N, BLOCK_N] tile in registers), only as far as the live lanes go.
    n_live = sy * sx * (4 * KTOP)
    total = tl.zeros([BLOCK_N], tl.float32)
    seen = tl.zeros([BLOCK_N], tl.int32)
    for o0 in range(0, n_live, CB):
        other = o0 + tl.arange(0, CB)
        cls_o, score_o, ok_o, bad_o = _lanes(values_ptr, indices_ptr, s, other, r, c, H, W, K, Hf, Wf, GHf, GWf,
                                             a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP)
        same = (cls[:, None] == cls_o[None, :]) & ok_o[None, :]
        total += tl.sum(tl.where(same, score_o[None, :], 0.0), axis=1)  # A_c of each entry's class
        seen += tl.sum((same & (other[None, :] < lane[:, None])).to(tl.int32), axis=1)
    first = ok & (seen == 0)  # one entry per distinct class
    untouched = K - tl.sum(first.to(tl.int32), axis=0)
    top = tl.max(tl.where(ok, total, float("-inf")), axis=0)
    m = tl.where(untouched > 0, tl.maximum(top, 0.0), top)
    e_first = tl.where(first, tl.exp(total - m), 0.0)
    e_rest = tl.exp(-m)
    z_norm = tl.sum(e_first, axis=0) + untouched.to(tl.float32) * e_rest
    z_norm = tl.where(tl.sum(bad.to(tl.int32), axis=0) > 0, float("nan"), z_norm)
    keep = (1.0 - smoothing) / z_norm
    spread = smoothing / Kf
    t_rest = e_rest * keep + spread
    t_touch = tl.exp(total - m) * keep + spread
    if MODE == 0:
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            tl.store(out_row + offs, (tl.zeros([BLOCK_K], tl.float32) + t_rest).to(out_row.dtype.element_ty),
                     mask=offs < K)
        tl.debug_barrier()  # the dense store above must land before the touched classes overwrite it
        tl.store(out_row + cls, t_touch.to(out_row.dtype.element_ty), mask=ok)
    if MODE == 1:
        # CE = lse(z) * sum(t) - sum_c t_c z_c with sum(t) = 1 and
        # sum_c t_c z_c = keep * (e_rest * (sum(z) - sum_touched z) + sum_touched e_c z_c) + spread * sum(z)
        lse, zsum = _logsumexp(z_row, K, BLOCK_K)
        zc = tl.load(z_row + cls, mask=first, other=0.0).to(tl.float32)
        tz = keep * (e_rest * (zsum - tl.sum(zc, axis=0)) + tl.sum(e_first * zc, axis=0)) + spread * zsum
        tl.store(lse_slot, lse)
        tl.store(loss_slot, row_w * (lse - tz))
    if MODE == 2:
        # d(w * CE)/dz_c = w * (softmax(z)_c * sum(t) - t_c) = w * (exp(z_c - lse) - t_c)
        lse = tl.load(lse_slot)
        scale = tl.load(gout_ptr).to(tl.float32) * row_w
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (scale * (tl.exp(z - lse) - t_rest)).to(g_row.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        zc = tl.load(z_row + cls, mask=ok, other=0.0).to(tl.float32)
        tl.store(g_row + cls, (scale * (tl.exp(zc - lse) - t_touch)).to(g_row.dtype.element_ty), mask=ok)


@triton.jit
def _accumulate(scr, values_ptr, indices_ptr, affine_ptr, s, r, c, H, W, K, Hf, Wf, GHf, GWf,
                KTOP: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr, CHUNK: tl.constexpr):
    """Atomically add bin (r, c)'s sparse row of sample s into the float32 row scr[0:K]."""
    a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw = _geometry(
        affine_ptr, s, Hf, Wf, GHf, GWf, EPS, MAX_S)
    n_lanes = sy * sx * (4 * KTOP)
    n_bad = 0
    for g0 in range(0, n_lanes, CHUNK):
        g = g0 + tl.arange(0, CHUNK)
        cls, score, ok, bad = _lanes(values_ptr, indices_ptr, s, g, r, c, H, W, K, Hf, Wf, GHf, GWf,
                                     a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP)
        tl.atomic_add(scr + cls, score, mask=ok, sem="relaxed")
        n_bad += tl.sum(bad.to(tl.int32), axis=0)
    return n_bad


@triton.jit
def _dense_stats(scr, K, BLOCK_K: tl.constexpr):
    """(max, sum exp(x - max)) of the scratch row scr[0:K] (read past L1: it was built by atomics)."""
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
def _general_row(values_ptr, indices_ptr, affine_ptr, s, s2, lam, r, c, H, W, K, Hf, Wf, GHf, GWf, Kf,
                 smoothing, scr, out_row, z_row, g_row, loss_slot, lse_slot, row_w, gout_ptr,
                 KTOP: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr, MODE: tl.constexpr,
                 TWO: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """One row of any size through a dense float32 scratch row (two when TWO: the class row of a
    MixToken batch, lam * own + (1 - lam) * partner s2)."""
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        tl.store(scr + offs, tl.zeros([BLOCK_K], tl.float32), mask=offs < K)
        if TWO:
            tl.store(scr + K + offs, tl.zeros([BLOCK_K], tl.float32), mask=offs < K)
    tl.debug_barrier()
    n_bad = _accumulate(scr, values_ptr, indices_ptr, affine_ptr, s, r, c, H, W, K, Hf, Wf, GHf, GWf,
                        KTOP, EPS, MAX_S, CHUNK)
    if TWO:
        n_bad += _accumulate(scr + K, values_ptr, indices_ptr, affine_ptr, s2, r, c, H, W, K, Hf, Wf,
                             GHf, GWf, KTOP, EPS, MAX_S, CHUNK)
    tl.debug_barrier()
    spread = smoothing / Kf
    m1, z1 = _dense_stats(scr, K, BLOCK_K)
    keep1 = (1.0 - smoothing) / tl.where(n_bad > 0, float("nan"), z1)
    m2 = m1
    keep2 = keep1
    if TWO:
        m2, z2 = _dense_stats(scr + K, K, BLOCK_K)
        keep2 = (1.0 - smoothing) / tl.where(n_bad > 0, float("nan"), z2)
    lse = 0.0
    if MODE == 1:
        lse, zsum = _logsumexp(z_row, K, BLOCK_K)
    if MODE == 2:
        lse = tl.load(lse_slot)
    scale = row_w
    if MODE == 2:
        scale = tl.load(gout_ptr).to(tl.float32) * row_w
    tz = 0.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(scr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        t = tl.exp(x - m1) * keep1 + spread
        if TWO:
            x2 = tl.load(scr + K + offs, mask=mask, other=0.0, cache_modifier=".cg")
            t = lam * t + (1.0 - lam) * (tl.exp(x2 - m2) * keep2 + spread)
        if MODE == 0:
            tl.store(out_row + offs, t.to(out_row.dtype.element_ty), mask=mask)
        if MODE == 1:
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            tz += tl.sum(tl.where(mask, t * z, 0.0), axis=0)
        if MODE == 2:
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(g_row + offs, (scale * (tl.exp(z - lse) - t)).to(g_row.dtype.element_ty), mask=mask)
    if MODE == 1:
        tl.store(lse_slot, lse)
        tl.store(loss_slot, row_w * (lse - tz))
    tl.debug_barrier()  # every thread is done with the scratch before the next row zeroes it


@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def _token_rows_kernel(
    values_ptr,    # [B, KTOP, H, W] float16/float32 scores
    indices_ptr,   # [B, KTOP, H, W] int16/int32/int64 class ids
    affine_ptr,    # [B, 2, 3] output -> source map, float32/float64
    box_ptr,       # MIX_TENSOR: [B, 4] (box_stride 4) or [4] (box_stride 0) int (r1, c1, r2, c2)
    box_stride, br1, bc1, br2, bc2,  # MIX_SCALAR: the batch's box
    out_ptr,       # MODE 0: [B, 1 + T, K] targets
    cls_ptr,       # MODE 1/2: [B, K] class-token logits (contiguous)
    tok_ptr,       # MODE 1/2: [B, T, K] token logits (contiguous)
    gcls_ptr,      # MODE 2: [B, K] gradient of cls logits
    gtok_ptr,      # MODE 2: [B, T, K] gradient of token logits
    loss_ptr,      # MODE 1: [B, 1 + T] weighted per-row cross-entropy
    lse_ptr,       # MODE 1 writes, MODE 2 reads: [B, 1 + T] logsumexp of each logits row
    gout_ptr,      # MODE 2: [] upstream gradient
    scratch_ptr,   # [n_prog, 2, K] float32 (uninitialized; zeroed per use)
    counter_ptr,   # [1] int32, zero: the next row to take
    B, K, H, W, GH, GW, n_rows, n_prog,
    Hf, Wf, GHf, GWf, Kf, smoothing, cls_w, tok_w,
    KTOP: tl.constexpr, MODE: tl.constexpr, MIX: tl.constexpr,
    NT0: tl.constexpr, NT1: tl.constexpr, NT2: tl.constexpr,
    BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, PB: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Persistent over rows: rows [0, B) are class tokens, then tokens of sample 0, 1, ... . Rows
    are taken from an atomic counter, so programs that drew a (long) class row take fewer tokens."""
    pid = tl.program_id(0)
    T = GH * GW
    one = Hf * 0.0 + 1.0  # runtime 1.0 / 0 (literals would become constexpr inside the helpers)
    zero = pid * 0
    scr = scratch_ptr + pid.to(tl.int64) * (2 * K)
    row = tl.atomic_add(counter_ptr, 1)
    while row < n_rows:
        # Claim the next row now: the atomic's round trip overlaps this row's work.
        next_row = tl.atomic_add(counter_ptr, 1)
        is_cls = row < B
        rr = tl.maximum(row - B, 0)
        b = tl.where(is_cls, row, rr // T)
        tok = rr % T
        rt = tok // GW
        ct = tok % GW
        partner = B - 1 - b
        inside = rt < 0  # False
        lam = 1.0
        if MIX != 0:
            r1 = br1
            c1 = bc1
            r2 = br2
            c2 = bc2
            if MIX == 2:
                bp = box_ptr + b * box_stride
                r1 = tl.load(bp).to(tl.int32)
                c1 = tl.load(bp + 1).to(tl.int32)
                r2 = tl.load(bp + 2).to(tl.int32)
                c2 = tl.load(bp + 3).to(tl.int32)
            inside = (rt >= r1) & (rt < r2) & (ct >= c1) & (ct < c2)
            area = tl.maximum(tl.minimum(r2, GH) - tl.maximum(r1, 0), 0) * \
                tl.maximum(tl.minimum(c2, GW) - tl.maximum(c1, 0), 0)
            lam = 1.0 - area.to(tl.float32) / (GHf * GWf)
        t_out = tl.where(is_cls, 0, tok + 1)
        orow = b.to(tl.int64) * (T + 1) + t_out
        if is_cls:
            _general_row(values_ptr, indices_ptr, affine_ptr, b, partner, lam, zero, zero, H, W, K, Hf, Wf,
                         one, one, Kf, smoothing, scr, out_ptr + orow * K,
                         cls_ptr + b.to(tl.int64) * K, gcls_ptr + b.to(tl.int64) * K,
                         loss_ptr + orow, lse_ptr + orow, cls_w, gout_ptr,
                         KTOP, EPS, MAX_S, MODE, MIX != 0, BLOCK_K, CHUNK)
        else:
            src = tl.where(inside, partner, b)  # MixToken: the partner's clean target
            trow = (b.to(tl.int64) * T + tok) * K
            g00, g01, g02, g10, g11, g12, sy, sx, isy, isx, igh, igw = _geometry(
                affine_ptr, src, Hf, Wf, GHf, GWf, EPS, MAX_S)
            n_lanes = sy * sx * (4 * KTOP)
            if NT0 > 0:
                if n_lanes <= NT0:
                    _fast_row(values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, GHf, GWf, Kf, smoothing,
                              g00, g01, g02, g10, g11, g12, sy, sx, isy, isx, igh, igw, out_ptr + orow * K,
                              tok_ptr + trow, gtok_ptr + trow, loss_ptr + orow, lse_ptr + orow, tok_w, gout_ptr,
                              KTOP, MODE, NT0, BLOCK_K, PB)
            if NT1 > 0:
                if (n_lanes > NT0) & (n_lanes <= NT1):
                    _fast_row(values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, GHf, GWf, Kf, smoothing,
                              g00, g01, g02, g10, g11, g12, sy, sx, isy, isx, igh, igw, out_ptr + orow * K,
                              tok_ptr + trow, gtok_ptr + trow, loss_ptr + orow, lse_ptr + orow, tok_w, gout_ptr,
                              KTOP, MODE, NT1, BLOCK_K, PB)
            if NT2 > 0:
                if (n_lanes > NT1) & (n_lanes <= NT2):
                    _fast_row(values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, GHf, GWf, Kf, smoothing,
                              g00, g01, g02, g10, g11, g12, sy, sx, isy, isx, igh, igw, out_ptr + orow * K,
                              tok_ptr + trow, gtok_ptr + trow, loss_ptr + orow, lse_ptr + orow, tok_w, gout_ptr,
                              KTOP, MODE, NT2, BLOCK_K, PB)
            if n_lanes > NT2:
                _general_row(values_ptr, indices_ptr, affine_ptr, src, src, lam, rt, ct, H, W, K, Hf, Wf,
                             GHf, GWf, Kf, smoothing, scr, out_ptr + orow * K, tok_ptr + trow,
                             gtok_ptr + trow, loss_ptr + orow, lse_ptr + orow, tok_w, gout_ptr,
                             KTOP, EPS, MAX_S, MODE, False, BLOCK_K, CHUNK)
        row = next_row


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MixSpec:
    """A normalized MixToken box argument: ``mode`` MIX_*, a device tensor or four ints."""

    mode: int
    tensor: Optional[torch.Tensor] = None
    stride: int = 0
    scalars: tuple[int, int, int, int] = (0, 0, 0, 0)


def mix_spec(mix_box, batch: int, device: torch.device) -> MixSpec:
    """Accept ``None``, ``(r1, c1, r2, c2)``, a ``[4]`` / ``[B, 4]`` tensor or a ``plan.MixBox``.

    Python and numpy boxes travel as kernel scalars (no host-to-device copy); tensors stay where
    they are (moved only if on another device)."""
    if mix_box is None:
        return MixSpec(MIX_NONE)
    if hasattr(mix_box, "boxes") and hasattr(mix_box, "lam"):  # tl_fast.plan.MixBox
        mix_box = mix_box.boxes
    if not isinstance(mix_box, torch.Tensor):
        arr = np.asarray(mix_box)
        if arr.shape in ((4,), (1, 4)):
            r1, c1, r2, c2 = (int(x) for x in arr.reshape(4))
            return MixSpec(MIX_SCALAR, scalars=(r1, c1, r2, c2))
        mix_box = torch.as_tensor(arr)
    box = mix_box
    if box.is_floating_point() or box.dtype == torch.bool:
        raise TypeError(f"mix_box must hold integers (token units); got {box.dtype}")
    if box.device != device:
        box = box.to(device)
    if box.shape == (4,) or box.shape == (1, 4):
        return MixSpec(MIX_TENSOR, box.contiguous().view(4), 0)
    if box.shape != (batch, 4):
        raise ValueError(f"mix_box must be (r1, c1, r2, c2) or [B, 4]; got shape {tuple(box.shape)} for B={batch}")
    return MixSpec(MIX_TENSOR, box.contiguous(), 4)


def _tiers(topk: int) -> tuple[int, int, int]:
    """Fast-path lane blocks usable for ``k`` (each holds at least one sample's 4 * k entries),
    left-padded with 0 (disabled) so that enabled tiers are increasing."""
    usable = [n for n in (32, 64, 128) if n >= 4 * topk]
    return tuple([0] * (3 - len(usable)) + usable)  # type: ignore[return-value]


_SM_COUNT: dict[int, int] = {}


def _num_programs(n_rows: int, device: torch.device, num_classes: int) -> int:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        progs = _SM_COUNT[idx] * PROGRAMS_PER_SM
        progs = min(progs, max(1, (64 << 20) // (8 * num_classes)))  # scratch <= 64 MiB
    else:  # interpreter: programs run one after another; a few exercise the persistent loop
        progs = 5
    return max(1, min(n_rows, progs))


def check_maps(values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, num_classes: int) -> None:
    """Shape and dtype checks that need no device synchronization."""
    if values.dim() != 4 or indices.shape != values.shape:
        raise ValueError(f"values and indices must both be [B, k, H, W]; got {tuple(values.shape)} and "
                         f"{tuple(indices.shape)}")
    if affine.shape != (values.shape[0], 2, 3):
        raise ValueError(f"affine must be [B, 2, 3] = [{values.shape[0]}, 2, 3]; got {tuple(affine.shape)}")
    if num_classes <= 0 or values.numel() == 0:
        raise ValueError("num_classes must be positive and maps non-empty")
    if not values.is_floating_point() or indices.is_floating_point():
        raise TypeError(f"values must be floating point and indices integer; got {values.dtype}, {indices.dtype}")
    if not affine.is_floating_point():
        raise TypeError(f"affine must be floating point; got {affine.dtype}")
    if not (values.device == indices.device == affine.device):
        raise ValueError(f"values, indices and affine must be on one device; got {values.device}, "
                         f"{indices.device}, {affine.device}")


def launch_rows(
    mode: int, values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: tuple[int, int], smoothing: float, mix: MixSpec, out: Optional[torch.Tensor] = None,
    cls_logits: Optional[torch.Tensor] = None, token_logits: Optional[torch.Tensor] = None,
    grad_cls: Optional[torch.Tensor] = None, grad_tok: Optional[torch.Tensor] = None,
    row_loss: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
    grad_out: Optional[torch.Tensor] = None, cls_w: float = 0.0, tok_w: float = 0.0,
    programs: Optional[int] = None,
) -> None:
    """Launch :func:`_token_rows_kernel` over all ``B * (1 + Gh*Gw)`` rows (one launch, no sync)."""
    bsz, topk, h, w = values.shape
    gh, gw = grid
    n_rows = bsz * (1 + gh * gw)
    device = values.device
    n_prog = programs or _num_programs(n_rows, device, num_classes)
    scratch = torch.empty(n_prog, 2, num_classes, dtype=torch.float32, device=device)
    dummy = scratch
    nt0, nt1, nt2 = _tiers(topk)
    block_k = min(triton.next_power_of_2(num_classes), 2048)
    box = mix.tensor if mix.tensor is not None else dummy
    _token_rows_kernel[(n_prog,)](
        values.contiguous(), indices.contiguous(), affine.contiguous(), box, mix.stride, *mix.scalars,
        out if out is not None else dummy,
        cls_logits if cls_logits is not None else dummy, token_logits if token_logits is not None else dummy,
        grad_cls if grad_cls is not None else dummy, grad_tok if grad_tok is not None else dummy,
        row_loss if row_loss is not None else dummy, lse if lse is not None else dummy,
        grad_out if grad_out is not None else dummy, scratch, torch.zeros(1, dtype=torch.int32, device=device),
        bsz, num_classes, h, w, gh, gw, n_rows, n_prog,
        float(h), float(w), float(gh), float(gw), float(num_classes), float(smoothing), float(cls_w), float(tok_w),
        KTOP=topk, MODE=mode, MIX=mix.mode, NT0=nt0, NT1=nt1, NT2=nt2, BLOCK_K=block_k, CHUNK=CHUNK, PB=PAIR_BLOCK,
        EPS=EXTENT_EPS, MAX_S=float(MAX_SAMPLES_PER_AXIS), num_warps=NUM_WARPS,
    )


def token_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32, programs: Optional[int] = None,
) -> torch.Tensor:
    """Token targets ``[B, 1 + Gh*Gw, K]`` (``out_dtype``) in one kernel launch.

    values [B, k, H, W] float16 scores; indices [B, k, H, W] int16/int32 class ids; affine [B, 2, 3]
    (normalized output -> source); mix_box None, ``(r1, c1, r2, c2)`` or ``[B, 4]``. Semantics:
    ``tl_fast.ops.reference.token_targets``. ``programs`` overrides the persistent grid size.
    """
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] <= 0 or grid[1] <= 0:
        raise ValueError(f"grid must be positive; got {grid}")
    check_maps(values, indices, affine, num_classes)
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {out_dtype}")
    bsz = values.shape[0]
    out = torch.empty(bsz, 1 + grid[0] * grid[1], num_classes, dtype=out_dtype, device=values.device)
    launch_rows(MODE_TARGETS, values, indices, affine, num_classes=num_classes, grid=grid,
                smoothing=smoothing, mix=mix_spec(mix_box, bsz, values.device), out=out, programs=programs)
    return out


__all__ = ["token_targets", "launch_rows", "mix_spec", "MixSpec", "check_maps", "EXTENT_EPS"]

