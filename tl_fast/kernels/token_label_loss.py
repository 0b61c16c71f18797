"""Fused token-labeling loss: soft-target cross-entropy straight from compressed maps (docs/spec.md section 3).

    loss = cls_weight * mean_b CE(cls_logits[b], t[b, 0]) + dense_weight * mean_{b,i} CE(token_logits[b, i], t[b, 1+i])
    CE(z, t) = -sum_c t_c log softmax(z)_c = lse(z) * sum_c t_c - sum_c t_c z_c

The ``[B, 1 + T, K]`` targets are never materialized and backward never re-runs the sparse stage.

Token rows. A token's target is sparse (:mod:`tl_fast.kernels._rows`): ``D`` distinct touched classes with
targets ``t_j`` and one constant share ``r`` for every other class, and ``sum_c t_c = 1``. So::

    sum_c t_c z_c = r * sum_c z_c + sum_{j touched, distinct} (t_j - r) * z_j
    CE = lse(z) - r * sum(z) - sum_j (t_j - r) * z_j

Forward (:func:`loss_token_fwd_kernel`, one program per sample and tile of rows, geometry once per
program): the row's lanes and all-pairs class totals give ``t_j`` and ``r``; one pass over the logits
row gives an online log-sum-exp and ``sum(z)``; a gather at the ``D`` touched classes finishes CE.
It stores the row's weighted CE and its *sparse record*: ``lse``, ``r``, ``D`` and the compacted
``(class j, t_j - r)`` pairs.

Backward. For a row of weight ``w`` (cls_weight / B, or dense_weight / (B * T)) and upstream
gradient ``g_out``::

    d(w * CE)/dz_c = w * (softmax(z)_c * sum_j t_j - t_c) = w * (exp(z_c - lse) - t_c)
    untouched c:  g_c = g_out * w * (exp(z_c - lse) - r)
    touched j:    g_j = g_out * w * (exp(z_j - lse) - r - (t_j - r))

:func:`loss_bwd_kernel` reads each logits row once and writes the untouched formula densely (vector
stores), then, after a CTA barrier, rewrites the ``D`` touched classes from the record. ``g_out`` is
read on the device: no ``.item()``, no host synchronization in forward or backward.

Rows whose lane list is longer than one register block (large maps over small grids) take the
general path in kernels of their own (``loss_long_fwd_kernel``, ``loss_long_bwd_kernel``: at the
usual sizes their programs find no such row and exit); they keep no record (``D = -1``) and their
backward rebuilds their sparse targets.

Class rows pool the whole crop (thousands of lanes) and are split over programs
(``token_targets.class_rows_kernel``), so their dense targets are kept: ``[B, K]`` float32, the
size of one logits row per sample. Forward and backward treat them as dense soft targets in an
extra tile column of the same kernels. A row with a class id outside ``[0, K)`` gets a NaN target,
so its loss and gradients are NaN (the reference rejects such ids).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _rows
from .token_targets import (DEFAULT_LAUNCH, EXTENT_EPS, LONG_ROW_CB, LONG_ROW_TILE, MAX_SAMPLES_PER_AXIS, Launch,
                            MixSpec, block_k, check_maps, geometry_args, lane_block, launch_class_rows, mix_spec)


@triton.jit
def _lse_sum(z_row, K, BLOCK_K: tl.constexpr):
    """(log-sum-exp, sum) of z_row[0:K] in float32, one online pass (a running max rescales the sum)."""
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
def _dense_ce(z_row, t_row, K, BLOCK_K: tl.constexpr):
    """(lse, sum_c t_c z_c) of a logits row against a dense float32 target row, one pass."""
    m = float("-inf")
    acc = 0.0
    tz = 0.0
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        tz += tl.sum(t * tl.where(mask, z, 0.0), axis=0)
        m = m_new
    return m + tl.log(acc), tz


@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def loss_token_fwd_kernel(
    values_ptr, indices_ptr, affine_ptr,   # [B, KTOP, H, W] scores / ids, [B, 2, 3] affines
    box_ptr, box_stride, br1, bc1, br2, bc2,  # MixToken box (see _rows.mix_box)
    cls_ptr, tok_ptr,   # [B, K] / [B, T, K] logits
    tcls_ptr,           # [B, K] float32 class-row targets (class_rows_kernel)
    loss_ptr, lse_ptr,  # [B, 1 + T] float32: weighted CE and lse of each row
    r_ptr, cnt_ptr,     # [B, T] float32 / int32: constant share, #records (-1: no record)
    rec_cls_ptr, rec_d_ptr,  # [B, T, BLOCK_N] int32 / float32: touched classes and t_j - r
    cls_w, tok_w,
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, CB: tl.constexpr, BLOCK_K: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, cdiv(T, TILE) + 1): tile column j < cdiv(T, TILE) holds token rows, the last one the
    class row."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    K = KV * VEC
    T = GH * GW
    b64 = b.to(tl.int64)
    if j * TILE >= T:  # the class row: dense targets from class_rows_kernel
        lse, tz = _dense_ce(cls_ptr + b64 * K, tcls_ptr + b64 * K, K, BLOCK_K)
        tl.store(lse_ptr + b64 * (T + 1), lse)
        tl.store(loss_ptr + b64 * (T + 1), cls_w * (lse - tz))
    else:
        g00, g01, g02, g10, g11, g12, gsy, gsx, gisy, gisx, gigh, gigw = _rows.geometry(
            affine_ptr, b, Hf, Wf, GHf, GWf, EPS, MAX_S)
        partner = B - 1 - b
        p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx = g00, g01, g02, g10, g11, g12, gsy, gsx, gisy, gisx
        if MIX != 0:
            p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx, _gh, _gw = _rows.geometry(
                affine_ptr, partner, Hf, Wf, GHf, GWf, EPS, MAX_S)
        r1, c1, r2, c2, lam = _rows.mix_box(box_ptr, box_stride, br1, bc1, br2, bc2, b, GH, GW, GHf, GWf, MIX)
        for i in range(TILE):
            tok = j * TILE + i
            if tok < T:
                rt, ct, inside = _rows.token_cell(tok, GW, r1, c1, r2, c2, MIX)
                src = tl.where(inside, partner, b)
                a00, a01, a02, a10, a11, a12, sy, sx, isy, isx = _rows.choose_geometry(
                    inside, p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx,
                    g00, g01, g02, g10, g11, g12, gsy, gsx, gisy, gisx)
                trow = b64 * T + tok
                z_row = tok_ptr + trow * K
                n_live = sy * sx * (4 * KTOP)
                if n_live <= BLOCK_N:  # longer rows: loss_long_fwd_kernel
                    lse, zsum = _lse_sum(z_row, K, BLOCK_K)
                    cls, score, ok, bad = _rows.lanes(values_ptr, indices_ptr, src, tl.arange(0, BLOCK_N), rt, ct,
                                                      H, W, K, Hf, Wf, a00, a01, a02, a10, a11, a12, sy, sx,
                                                      isy, isx, gigh, gigw, KTOP)
                    total, first = _rows.pair_totals(cls, score, n_live, BLOCK_N, CB)
                    t_touch, r = _rows.sparse_softmax(total, first, tl.sum(bad.to(tl.int32), axis=0), K, Kf,
                                                      smoothing)
                    d = t_touch - r
                    zc = tl.load(z_row + cls, mask=first, other=0.0).to(tl.float32)
                    tz = r * zsum + tl.sum(tl.where(first, d * zc, 0.0), axis=0)
                    # Compacted record: the i-th distinct class goes to slot i.
                    slot = tl.cumsum(first.to(tl.int32), axis=0) - 1
                    rec = trow * BLOCK_N + slot
                    tl.store(rec_cls_ptr + rec, cls, mask=first)
                    tl.store(rec_d_ptr + rec, d, mask=first)
                    n_rec = tl.sum(first.to(tl.int32), axis=0)
                    orow = b64 * (T + 1) + 1 + tok
                    tl.store(lse_ptr + orow, lse)
                    tl.store(loss_ptr + orow, tok_w * (lse - tz))
                    tl.store(r_ptr + trow, r)
                    tl.store(cnt_ptr + trow, n_rec)


@triton.jit
def loss_bwd_kernel(
    cls_ptr, tok_ptr,        # [B, K] / [B, T, K] logits
    gcls_ptr, gtok_ptr,      # their gradients (same dtypes)
    tcls_ptr,                # [B, K] float32 class-row targets
    lse_ptr, r_ptr, cnt_ptr, rec_cls_ptr, rec_d_ptr,  # the forward's records
    gout_ptr,                # [] float32 upstream gradient
    cls_w, tok_w,
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, CB: tl.constexpr, BLOCK_K: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, cdiv(T, TILE) + 1), as the forward: g = g_out * w * (softmax(z) - t)."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    K = KV * VEC
    T = GH * GW
    b64 = b.to(tl.int64)
    gout = tl.load(gout_ptr).to(tl.float32)
    if j * TILE >= T:  # the class row, dense targets
        lse = tl.load(lse_ptr + b64 * (T + 1))
        scale = gout * cls_w
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            z = tl.load(cls_ptr + b64 * K + offs, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(tcls_ptr + b64 * K + offs, mask=mask, other=0.0)
            tl.store(gcls_ptr + b64 * K + offs, (scale * (tl.exp(z - lse) - t)).to(gcls_ptr.dtype.element_ty),
                     mask=mask)
    else:
        scale = gout * tok_w
        for i in range(TILE):
            tok = j * TILE + i
            if tok < T:
                trow = b64 * T + tok
                lse = tl.load(lse_ptr + b64 * (T + 1) + 1 + tok)
                r = tl.load(r_ptr + trow)
                n_rec = tl.load(cnt_ptr + trow)
                z_row = tok_ptr + trow * K
                g_row = gtok_ptr + trow * K
                for k0 in range(0, K, BLOCK_K):
                    offs = k0 + tl.arange(0, BLOCK_K)
                    mask = offs < K
                    z = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
                    tl.store(g_row + offs, (scale * (tl.exp(z - lse) - r)).to(gtok_ptr.dtype.element_ty), mask=mask)
                tl.debug_barrier()  # the dense pass lands before the touched classes are rewritten
                if n_rec >= 0:  # rows without a record: loss_long_bwd_kernel scatters their classes
                    slot = tl.arange(0, BLOCK_N)
                    has = slot < n_rec
                    cls = tl.load(rec_cls_ptr + trow * BLOCK_N + slot, mask=has, other=0)
                    d = tl.load(rec_d_ptr + trow * BLOCK_N + slot, mask=has, other=0.0)
                    zc = tl.load(z_row + cls, mask=has, other=0.0).to(tl.float32)
                    tl.store(g_row + cls, (scale * (tl.exp(zc - lse) - r - d)).to(gtok_ptr.dtype.element_ty),
                             mask=has)
                tl.debug_barrier()


@triton.jit
def _rebuild_grad_row(values_ptr, indices_ptr, affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2,
                      b, tok, z_row, g_row, lse, scale, B, K, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
                      KTOP: tl.constexpr, MIX: tl.constexpr, BLOCK_N: tl.constexpr, CB: tl.constexpr,
                      EPS: tl.constexpr, MAX_S: tl.constexpr):
    """Touched-class gradients of a row without a record (longer than one lane block)."""
    rt, ct, src, a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw = _rows.token_source(
        affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, b, tok, B, GH, GW, Hf, Wf, GHf, GWf,
                MIX, EPS, MAX_S)
    m, keep, _r = _rows.general_row(values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, Kf, smoothing,
                                    a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw, KTOP, BLOCK_N, CB)
    for g0 in range(0, sy * sx * (4 * KTOP), BLOCK_N):
        cls, total, first = _rows.general_block(
            values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, a00, a01, a02, a10, a11, a12,
            sy, sx, isy, isx, igh, igw, g0, KTOP, BLOCK_N, CB)
        t = tl.exp(total - m) * keep + smoothing / Kf
        zc = tl.load(z_row + cls, mask=first, other=0.0).to(tl.float32)
        tl.store(g_row + cls, (scale * (tl.exp(zc - lse) - t)).to(g_row.dtype.element_ty), mask=first)



@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def loss_long_fwd_kernel(
    values_ptr, indices_ptr, affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2,
    tok_ptr, loss_ptr, lse_ptr, r_ptr, cnt_ptr, tok_w,
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, CB: tl.constexpr, BLOCK_K: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, cdiv(T, TILE)): forward of b's token rows longer than BLOCK_N lanes (no record:
    count -1)."""
    b = tl.program_id(0)
    t0 = tl.program_id(1) * TILE
    K = KV * VEC
    T = GH * GW
    b64 = b.to(tl.int64)
    if _rows.has_long_rows(affine_ptr, b, B, Hf, Wf, GHf, GWf, KTOP, MIX, BLOCK_N, EPS, MAX_S):
        for tok in range(t0, tl.minimum(t0 + TILE, T)):
            rt, ct, src, a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw = _rows.token_source(
                affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, b, tok, B, GH, GW, Hf, Wf, GHf, GWf,
                MIX, EPS, MAX_S)
            n_live = sy * sx * (4 * KTOP)
            if n_live > BLOCK_N:
                trow = b64 * T + tok
                z_row = tok_ptr + trow * K
                m, keep, r = _rows.general_row(values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, Kf, smoothing,
                                               a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw,
                                               KTOP, BLOCK_N, CB)
                tz = 0.0
                for g0 in range(0, n_live, BLOCK_N):
                    cls, total, first = _rows.general_block(
                        values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, a00, a01, a02, a10, a11, a12,
                        sy, sx, isy, isx, igh, igw, g0, KTOP, BLOCK_N, CB)
                    d = tl.exp(total - m) * keep + smoothing / Kf - r
                    zc = tl.load(z_row + cls, mask=first, other=0.0).to(tl.float32)
                    tz += tl.sum(tl.where(first, d * zc, 0.0), axis=0)
                lse, zsum = _lse_sum(z_row, K, BLOCK_K)
                tz += r * zsum
                orow = b64 * (T + 1) + 1 + tok
                tl.store(lse_ptr + orow, lse)
                tl.store(loss_ptr + orow, tok_w * (lse - tz))
                tl.store(r_ptr + trow, r)
                tl.store(cnt_ptr + trow, -1)


@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def loss_long_bwd_kernel(
    values_ptr, indices_ptr, affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2,
    tok_ptr, gtok_ptr, lse_ptr, cnt_ptr, gout_ptr, tok_w,
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, CB: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, cdiv(T, TILE)), after loss_bwd_kernel: the touched classes of b's rows without a
    record (their dense part is written already)."""
    b = tl.program_id(0)
    t0 = tl.program_id(1) * TILE
    K = KV * VEC
    T = GH * GW
    b64 = b.to(tl.int64)
    if _rows.has_long_rows(affine_ptr, b, B, Hf, Wf, GHf, GWf, KTOP, MIX, BLOCK_N, EPS, MAX_S):
        scale = tl.load(gout_ptr).to(tl.float32) * tok_w
        for tok in range(t0, tl.minimum(t0 + TILE, T)):
            trow = b64 * T + tok
            if tl.load(cnt_ptr + trow) < 0:
                lse = tl.load(lse_ptr + b64 * (T + 1) + 1 + tok)
                _rebuild_grad_row(values_ptr, indices_ptr, affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2,
                                  b, tok, tok_ptr + trow * K, gtok_ptr + trow * K, lse, scale, B, K, H, W, GH, GW,
                                  Hf, Wf, GHf, GWf, Kf, smoothing, KTOP, MIX, BLOCK_N, CB, EPS, MAX_S)

# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossSpec:
    """Everything about the loss that is not a tensor."""

    num_classes: int
    grid: tuple[int, int]
    smoothing: float
    cls_weight: float
    dense_weight: float
    mix: MixSpec
    launch: Launch = field(default=DEFAULT_LAUNCH)

    def row_weights(self, batch: int) -> tuple[float, float]:
        tokens = self.grid[0] * self.grid[1]
        return self.cls_weight / batch, self.dense_weight / (batch * tokens)


@dataclass
class ForwardState:
    """What backward reads: per-row lse, the token rows' sparse records, the class-row targets."""

    lse: torch.Tensor
    r: torch.Tensor
    count: torch.Tensor
    rec_cls: torch.Tensor
    rec_d: torch.Tensor
    tcls: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.lse, self.r, self.count, self.rec_cls, self.rec_d, self.tcls


def _common(values, spec: LossSpec, vec: int, tile: int):
    bsz, topk = values.shape[:2]
    block_n = lane_block(topk)
    tokens = spec.grid[0] * spec.grid[1]
    grid = (bsz, triton.cdiv(tokens, tile) + 1)
    scalars = (bsz, spec.num_classes // vec, *geometry_args(values, spec.grid, spec.num_classes, spec.smoothing)[1:])
    meta = dict(KTOP=topk, MIX=spec.mix.mode, VEC=vec, TILE=tile, BLOCK_N=block_n, CB=min(16, block_n),
                BLOCK_K=block_k(spec.num_classes), EPS=EXTENT_EPS, MAX_S=float(MAX_SAMPLES_PER_AXIS),
                num_warps=spec.launch.warps)
    return grid, scalars, meta, block_n


def _vec(spec: LossSpec, *logits: torch.Tensor) -> int:
    from .token_targets import vector_width

    return vector_width(spec.num_classes, max(t.element_size() for t in logits))


def forward(cls_logits, token_logits, values, indices, affine, spec: LossSpec):
    """(loss, ForwardState): the class-row kernel, then the token forward kernel; no host sync."""
    bsz, tokens = token_logits.shape[0], token_logits.shape[1]
    device = cls_logits.device
    vec = _vec(spec, cls_logits, token_logits)
    grid, scalars, meta, block_n = _common(values, spec, vec, spec.launch.tile)
    tcls = torch.empty(bsz, spec.num_classes, dtype=torch.float32, device=device)
    launch_class_rows(values, indices, affine, spec.mix, tcls, spec.num_classes, num_classes=spec.num_classes,
                      grid=spec.grid, smoothing=spec.smoothing, vec=vector_width_f32(spec.num_classes),
                      launch=spec.launch)
    rows = torch.empty(bsz, 1 + tokens, dtype=torch.float32, device=device)
    lse = torch.empty_like(rows)
    r = torch.empty(bsz, tokens, dtype=torch.float32, device=device)
    count = torch.empty(bsz, tokens, dtype=torch.int32, device=device)
    rec_cls = torch.empty(bsz, tokens, block_n, dtype=torch.int32, device=device)
    rec_d = torch.empty(bsz, tokens, block_n, dtype=torch.float32, device=device)
    cls_w, tok_w = spec.row_weights(bsz)
    box = spec.mix.tensor if spec.mix.tensor is not None else count
    loss_token_fwd_kernel[grid](
        values, indices, affine, box, spec.mix.stride, *spec.mix.scalars, cls_logits, token_logits, tcls,
        rows, lse, r, count, rec_cls, rec_d, cls_w, tok_w, *scalars, **meta)
    long_meta = meta | {"TILE": LONG_ROW_TILE, "CB": LONG_ROW_CB}
    loss_long_fwd_kernel[(bsz, triton.cdiv(tokens, LONG_ROW_TILE))](
        values, indices, affine, box, spec.mix.stride, *spec.mix.scalars, token_logits, rows, lse, r, count, tok_w,
        *scalars, **long_meta)
    return rows.sum(), ForwardState(lse, r, count, rec_cls, rec_d, tcls)


def vector_width_f32(num_classes: int) -> int:
    from .token_targets import vector_width

    return vector_width(num_classes, 4)


def backward(grad_out, cls_logits, token_logits, values, indices, affine, state: ForwardState, spec: LossSpec):
    """(grad_cls, grad_tok) in the logits' dtypes: one kernel, no host sync."""
    grad_cls = torch.empty_like(cls_logits)
    grad_tok = torch.empty_like(token_logits)
    vec = _vec(spec, cls_logits, token_logits)
    grid, scalars, meta, _ = _common(values, spec, vec, spec.launch.tile)
    cls_w, tok_w = spec.row_weights(cls_logits.shape[0])
    box = spec.mix.tensor if spec.mix.tensor is not None else state.count
    gout = grad_out.to(torch.float32).contiguous()
    loss_bwd_kernel[grid](
        cls_logits, token_logits,
        grad_cls, grad_tok, state.tcls, state.lse, state.r, state.count, state.rec_cls, state.rec_d,
        gout, cls_w, tok_w, *scalars, **meta)
    long_meta = {k: v for k, v in meta.items() if k != "BLOCK_K"} | {"TILE": LONG_ROW_TILE, "CB": LONG_ROW_CB}
    loss_long_bwd_kernel[(grid[0], triton.cdiv(spec.grid[0] * spec.grid[1], LONG_ROW_TILE))](
        values, indices, affine, box, spec.mix.stride, *spec.mix.scalars, token_logits, grad_tok, state.lse,
        state.count, gout, tok_w, *scalars, **long_meta)
    return grad_cls, grad_tok


class TokenLabelLossFunction(torch.autograd.Function):
    """Autograd wrapper: logits are differentiable, the label side is not."""

    @staticmethod
    def forward(ctx, cls_logits, token_logits, values, indices, affine, spec: LossSpec):
        loss, state = forward(cls_logits, token_logits, values, indices, affine, spec)
        ctx.save_for_backward(cls_logits, token_logits, values, indices, affine, *state.tensors())
        ctx.spec = spec
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        cls_logits, token_logits, values, indices, affine, *rest = ctx.saved_tensors
        grad_cls, grad_tok = backward(grad_out, cls_logits, token_logits, values, indices, affine,
                                      ForwardState(*rest), ctx.spec)
        return grad_cls, grad_tok, None, None, None, None


def token_label_loss(
    cls_logits: torch.Tensor, token_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
    affine: torch.Tensor, *, num_classes: Optional[int] = None, grid: Optional[Sequence[int]] = None,
    smoothing: float = 0.0, mix_box=None, cls_weight: float = 1.0, dense_weight: float = 1.0,
    launch: Launch = DEFAULT_LAUNCH,
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
                    mix_spec(mix_box, bsz, values.device), launch)
    return TokenLabelLossFunction.apply(cls_logits.contiguous(), token_logits.contiguous(), values.contiguous(),
                                        indices.contiguous(), affine.contiguous(), spec)


__all__ = ["token_label_loss", "TokenLabelLossFunction", "LossSpec", "ForwardState", "forward", "backward"]
