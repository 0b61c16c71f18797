"""Device helpers shared by the targets and loss kernels: geometry, sparse lanes, sparse row stats.

A row (a token of a sample, or its class token) is a softmax over ``K`` classes of RoI-Aligned
scores. Its scores are sparse: ``Sy * Sx`` bilinear samples, four map pixels each, ``k`` (class,
score) pairs per pixel, so the row is a list of ``n = Sy * Sx * 4 * k`` weighted *lanes*. With
``A_c`` the summed score of each distinct touched class and ``U = K - #distinct`` untouched classes
(score exactly 0)::

    m = max(max_c A_c, 0 if U > 0)          Z = sum_c exp(A_c - m) + U * exp(-m)
    t_c = (1 - s) * exp(A_c - m) / Z + s / K   (touched)
    r   = (1 - s) * exp(-m) / Z + s / K         (every untouched class: the constant share)

A touched class whose sum is 0 equals an untouched one, so counting it either way gives the same
row. Geometry (widening, adaptive sample counts, positions, bilinear weights) is evaluated in
float64 exactly as ``tl_fast.ops.reference``; scores accumulate in float32. Class ids outside
``[0, K)`` poison their row with NaN (and are never used as an address).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def geometry(affine_ptr, s, Hf, Wf, GHf, GWf, EPS: tl.constexpr, MAX_S: tl.constexpr):
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
    inv_du = 1.0 / du
    inv_dv = 1.0 / dv
    a00 = a00 * inv_du
    a10 = a10 * inv_du
    a01 = a01 * inv_dv
    a11 = a11 * inv_dv
    ext_u = tl.sqrt((a00 * w) * (a00 * w) + (a10 * h) * (a10 * h)) / tl.cast(GWf, tl.float64) - EPS
    ext_v = tl.sqrt((a01 * w) * (a01 * w) + (a11 * h) * (a11 * h)) / tl.cast(GHf, tl.float64) - EPS
    ext_u = tl.minimum(tl.maximum(ext_u, 0.0), MAX_S)
    ext_v = tl.minimum(tl.maximum(ext_v, 0.0), MAX_S)
    sx = ext_u.to(tl.int32)  # trunc == floor for ext >= 0; then ceil
    sy = ext_v.to(tl.int32)
    sx = tl.maximum(tl.where(sx.to(tl.float64) < ext_u, sx + 1, sx), 1)
    sy = tl.maximum(tl.where(sy.to(tl.float64) < ext_v, sy + 1, sy), 1)
    # Reciprocals for the per-lane sample positions (they differ from the reference's divisions by
    # an ulp of float64, far below the float32 output).
    inv_sy = 1.0 / sy.to(tl.float64)
    inv_sx = 1.0 / sx.to(tl.float64)
    inv_gh = 1.0 / tl.cast(GHf, tl.float64)
    inv_gw = 1.0 / tl.cast(GWf, tl.float64)
    return a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw


@triton.jit
def mix_box(box_ptr, box_stride, br1, bc1, br2, bc2, b, GH, GW, GHf, GWf, MIX: tl.constexpr):
    """Sample ``b``'s MixToken box (r1, c1, r2, c2) and ``lam = 1 - area / T``.

    MIX 0: no box (an empty one), 1: the batch's box as scalars, 2: a tensor ([4] with stride 0 or
    [B, 4] with stride 4)."""
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
    area = tl.maximum(tl.minimum(r2, GH) - tl.maximum(r1, 0), 0) * \
        tl.maximum(tl.minimum(c2, GW) - tl.maximum(c1, 0), 0)
    lam = 1.0 - area.to(tl.float32) / (GHf * GWf)
    if MIX == 0:
        lam = 1.0 + 0.0 * lam
    return r1, c1, r2, c2, lam


@triton.jit
def token_cell(tok, GW, r1, c1, r2, c2, MIX: tl.constexpr):
    """Grid row and column of token ``tok`` and whether the MixToken box ``[r1, r2) x [c1, c2)`` covers it."""
    rt = tok // GW
    ct = tok % GW
    inside = (rt >= r1) & (rt < r2) & (ct >= c1) & (ct < c2)
    if MIX == 0:
        inside = rt < 0
    return rt, ct, inside


@triton.jit
def choose_geometry(inside, p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx,
                    g00, g01, g02, g10, g11, g12, gsy, gsx, gisy, gisx):
    """The partner's :func:`geometry` (``p*``) for a token inside the box, the sample's own (``g*``) outside."""
    return (tl.where(inside, p00, g00), tl.where(inside, p01, g01), tl.where(inside, p02, g02),
            tl.where(inside, p10, g10), tl.where(inside, p11, g11), tl.where(inside, p12, g12),
            tl.where(inside, psy, gsy), tl.where(inside, psx, gsx), tl.where(inside, pisy, gisy),
            tl.where(inside, pisx, gisx))


@triton.jit
def token_source(affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, b, tok, B, GH, GW, Hf, Wf, GHf, GWf,
                 MIX: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr):
    """Token ``tok`` of sample ``b``: its grid row and column, the sample its tokens come from (the
    partner ``B-1-b`` inside the MixToken box) and that sample's :func:`geometry`."""
    r1, c1, r2, c2, lam = mix_box(box_ptr, box_stride, br1, bc1, br2, bc2, b, GH, GW, GHf, GWf, MIX)
    rt, ct, inside = token_cell(tok, GW, r1, c1, r2, c2, MIX)
    src = tl.where(inside, B - 1 - b, b)
    a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw = geometry(affine_ptr, src, Hf, Wf, GHf, GWf, EPS, MAX_S)
    return rt, ct, src, a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw


@triton.jit
def lanes(values_ptr, indices_ptr, s, g, r, c, H, W, K, Hf, Wf,
          a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP: tl.constexpr):
    """Lanes ``g`` (a 1-D block of lane ids) of bin ``(r, c)``'s sparse row of sample ``s``, whose
    geometry (:func:`geometry`) the caller computed once.

    values_ptr, indices_ptr: [B, KTOP, H, W]. Lane g is (sample q, corner, j) with
    g = ((q * 4) + corner) * KTOP + j, q = iy * Sx + ix. Returns (class, score, ok, bad): ok marks
    live lanes with a valid class (class -1 elsewhere), bad live lanes whose class is outside [0, K).
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
def pair_totals(cls, score, n_live, BLOCK_N: tl.constexpr, CB: tl.constexpr):
    """Each lane's class total ``A_c`` and whether it is its class's first lane, from one all-pairs
    pass over the lanes built once (``cls`` = -1 on dead lanes): the other lanes come in chunks of
    ``CB`` gathered from the same registers, only as far as the live lanes go."""
    lane = tl.arange(0, BLOCK_N)
    total = tl.zeros([BLOCK_N], tl.float32)
    seen = tl.zeros([BLOCK_N], tl.int32)
    for o0 in range(0, n_live, CB):
        other = o0 + tl.arange(0, CB)
        cls_o = tl.gather(cls, other, 0)
        score_o = tl.gather(score, other, 0)
        same = (cls[:, None] == cls_o[None, :]) & (cls_o[None, :] >= 0)
        total += tl.sum(tl.where(same, score_o[None, :], 0.0), axis=1)
        seen += tl.sum((same & (other[None, :] < lane[:, None])).to(tl.int32), axis=1)
    first = (cls >= 0) & (seen == 0)
    return total, first


@triton.jit
def sparse_softmax(total, first, n_bad, K, Kf, smoothing):
    """(t_touch per lane, r) of a row from its class totals: the touched classes' targets (valid on
    ``first`` lanes) and the untouched classes' constant share. NaN when the row has a bad id."""
    untouched = K - tl.sum(first.to(tl.int32), axis=0)
    top = tl.max(tl.where(first, total, float("-inf")), axis=0)
    m = tl.where(untouched > 0, tl.maximum(top, 0.0), top)
    e_first = tl.where(first, tl.exp(total - m), 0.0)
    e_rest = tl.exp(-m)
    z_norm = tl.sum(e_first, axis=0) + untouched.to(tl.float32) * e_rest
    z_norm = tl.where(n_bad > 0, float("nan"), z_norm)
    keep = (1.0 - smoothing) / z_norm
    spread = smoothing / Kf
    return tl.exp(total - m) * keep + spread, e_rest * keep + spread


@triton.jit
def general_stats(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf,
                  a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw,
                  KTOP: tl.constexpr, BLOCK_N: tl.constexpr, CB: tl.constexpr):
    """Softmax statistics of a row of any length (more lanes than one block): own lanes in blocks of
    ``BLOCK_N`` against every other lane in chunks of ``CB`` (rebuilt, as they do not fit in
    registers). Returns (max over distinct class totals M, sum exp(A_c - M), #distinct, #bad)."""
    n_live = sy * sx * (4 * KTOP)
    big_m = float("-inf")
    acc = 0.0
    n_first = 0
    n_bad = 0
    for g0 in range(0, n_live, BLOCK_N):
        lane = g0 + tl.arange(0, BLOCK_N)
        cls, score, ok, bad = lanes(values_ptr, indices_ptr, s, lane, r, c, H, W, K, Hf, Wf,
                                    a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP)
        total, first = _rebuilt_totals(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf, a00, a01, a02, a10,
                                       a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, cls, lane, n_live,
                                       KTOP, CB)
        n_first += tl.sum(first.to(tl.int32), axis=0)
        n_bad += tl.sum(bad.to(tl.int32), axis=0)
        m_blk = tl.max(tl.where(first, total, float("-inf")), axis=0)
        m_new = tl.maximum(big_m, m_blk)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(big_m - m_safe) + tl.sum(tl.where(first, tl.exp(total - m_safe), 0.0), axis=0)
        big_m = m_new
    return big_m, acc, n_first, n_bad


@triton.jit
def general_softmax(big_m, acc, n_first, n_bad, K, Kf, smoothing):
    """(m, keep, r) of a long row from :func:`general_stats`: t_c = exp(A_c - m) * keep + s / K."""
    untouched = K - n_first
    m = tl.where(untouched > 0, tl.maximum(big_m, 0.0), big_m)
    m_safe = tl.where(big_m == float("-inf"), m, big_m)
    e_rest = tl.exp(-m)
    z_norm = acc * tl.exp(m_safe - m) + untouched.to(tl.float32) * e_rest
    z_norm = tl.where(n_bad > 0, float("nan"), z_norm)
    keep = (1.0 - smoothing) / z_norm
    return m, keep, e_rest * keep + smoothing / Kf


@triton.jit
def general_block(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf,
                  a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, g0,
                  KTOP: tl.constexpr, BLOCK_N: tl.constexpr, CB: tl.constexpr):
    """Lanes ``g0 .. g0 + BLOCK_N`` of a long row: (class, total, first), second pass."""
    n_live = sy * sx * (4 * KTOP)
    lane = g0 + tl.arange(0, BLOCK_N)
    cls, score, ok, bad = lanes(values_ptr, indices_ptr, s, lane, r, c, H, W, K, Hf, Wf,
                                a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, KTOP)
    total, first = _rebuilt_totals(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf, a00, a01, a02, a10,
                                   a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, cls, lane, n_live, KTOP, CB)
    return cls, total, first


@triton.jit
def _rebuilt_totals(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf, a00, a01, a02, a10, a11, a12,
                    sy, sx, inv_sy, inv_sx, inv_gh, inv_gw, cls, lane, n_live,
                    KTOP: tl.constexpr, CB: tl.constexpr):
    total = tl.zeros(cls.shape, tl.float32)
    seen = tl.zeros(cls.shape, tl.int32)
    for o0 in range(0, n_live, CB):
        other = o0 + tl.arange(0, CB)
        cls_o, score_o, ok_o, bad_o = lanes(values_ptr, indices_ptr, s, other, r, c, H, W, K, Hf, Wf,
                                            a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh,
                                            inv_gw, KTOP)
        same = (cls[:, None] == cls_o[None, :]) & ok_o[None, :]
        total += tl.sum(tl.where(same, score_o[None, :], 0.0), axis=1)
        seen += tl.sum((same & (other[None, :] < lane[:, None])).to(tl.int32), axis=1)
    return total, (cls >= 0) & (seen == 0)


@triton.jit
def fill_row(row_ptr, value, K, BLOCK_K: tl.constexpr):
    """row[0:K] = value (dense, vectorized where K's divisibility is known)."""
    fill = (tl.zeros([BLOCK_K], tl.float32) + value).to(row_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        tl.store(row_ptr + offs, fill, mask=offs < K)


@triton.jit
def has_long_rows(affine_ptr, b, B, Hf, Wf, GHf, GWf, KTOP: tl.constexpr, MIX: tl.constexpr,
                  BLOCK_N: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr):
    """Whether any token row of b (own geometry, or the partner's under MixToken) has > BLOCK_N lanes."""
    _a, _b, _c, _d, _e, _f, sy, sx, _g, _h, _i, _j = geometry(affine_ptr, b, Hf, Wf, GHf, GWf, EPS, MAX_S)
    n = sy * sx * (4 * KTOP)
    if MIX != 0:
        _a, _b, _c, _d, _e, _f, psy, psx, _g, _h, _i, _j = geometry(affine_ptr, B - 1 - b, Hf, Wf, GHf, GWf,
                                                                   EPS, MAX_S)
        n = tl.maximum(n, psy * psx * (4 * KTOP))
    return n > BLOCK_N


@triton.jit
def general_row(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf, Kf, smoothing,
                a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh, inv_gw,
                KTOP: tl.constexpr, BLOCK_N: tl.constexpr, CB: tl.constexpr):
    """(m, keep, r) of a long row: t_c = exp(A_c - m) * keep + s / K on touched classes, r elsewhere."""
    big_m, acc, n_first, n_bad = general_stats(values_ptr, indices_ptr, s, r, c, H, W, K, Hf, Wf,
                                               a00, a01, a02, a10, a11, a12, sy, sx, inv_sy, inv_sx, inv_gh,
                                               inv_gw, KTOP, BLOCK_N, CB)
    return general_softmax(big_m, acc, n_first, n_bad, K, Kf, smoothing)
