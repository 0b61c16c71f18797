"""Token targets ``[B, 1 + Gh*Gw, K]`` from compressed top-k maps (docs/spec.md section 3) in two kernels.

* :func:`class_rows_kernel` — the class tokens. A class row pools the whole crop (thousands of
  lanes), so each is split over ``SPLIT`` programs that add their lanes' scores atomically into a
  ``[B, K]`` float32 scratch; a per-pair ticket makes the last of the programs of a MixToken pair
  ``{b, B-1-b}`` (which need each other's scores) soft-max both scratch rows and write both class
  rows, ``lam * own + (1 - lam) * partner``.
* :func:`token_tile_kernel` — the patch tokens. One program owns one sample and a tile of ``TILE``
  token rows; the sample's geometry and its MixToken partner's are computed once per program. Each
  row's lanes are built once (``BLOCK_N`` of them), an all-pairs pass over them gives every lane its
  class total and marks each class's first lane (:func:`tl_fast.kernels._rows.pair_totals`), and the row is
  written as a dense constant fill of the untouched classes' share ``r`` followed, after a CTA
  barrier, by a scatter of the touched classes (first lanes only; masked lanes never write).
* :func:`token_long_rows_kernel` — token rows with more lanes than one register block (large maps
  over small grids): a two-pass general path, in a kernel of its own so that its registers do not
  weigh on the tile kernel (at the usual sizes its programs find no such row and exit).

``K`` reaches the kernels as ``KV * VEC`` with ``VEC`` a compile-time power of two dividing ``K``
(up to 16 bytes of output), so Triton can prove that rows start on 16-byte boundaries and the dense
fill compiles to 128-bit stores; an odd ``K`` is ``VEC = 1`` (scalar stores, same values).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ..ops.reference import EXTENT_EPS  # sample counts are ceil(extent - EXTENT_EPS), as in the reference
from . import _rows
# Sample counts are capped per axis (an affine that blows a token up to > 1024 map pixels is not an
# augmentation); it keeps lane indices inside int32.
MAX_SAMPLES_PER_AXIS = 1024

MIX_NONE, MIX_SCALAR, MIX_TENSOR = 0, 1, 2
# Other-lane chunk of the long rows' all-pairs pass (they rebuild their lanes per chunk; a narrow
# chunk keeps that rare path free of spills).
LONG_ROW_CB = 8
# Token rows per long-row program (programs whose sample has no long row exit after its geometry).
LONG_ROW_TILE = 32


@dataclass(frozen=True)
class Launch:
    """Launch parameters (they never change results). ``None`` fields take the defaults below."""

    tile: int = 8          # token rows per program
    warps: int = 4         # warps per program, token kernels
    class_split: Optional[int] = None  # programs per class row (default: from the map size)
    class_chunk: int = 512  # lanes per class-row step
    class_warps: int = 4


DEFAULT_LAUNCH = Launch()


# ----------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def class_rows_kernel(
    values_ptr, indices_ptr, affine_ptr,   # [B, KTOP, H, W] scores / ids, [B, 2, 3] affines
    box_ptr, box_stride, br1, bc1, br2, bc2,  # MixToken box (see _rows.mix_box)
    scr_ptr,     # [B, K] float32 zeros: summed class scores
    nbad_ptr,    # [B] int32 zeros: bad ids seen per sample
    ticket_ptr,  # [B] int32 zeros: finished programs per pair
    out_ptr, out_stride_v,  # row b's target starts at out_ptr + b * out_stride_v * VEC (class row)
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing, SPLIT,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, SPLIT): program (b, part) adds lanes part, part + SPLIT, ... (chunks of CHUNK) of b's
    class row into scr[b]; the pair's last program writes the class rows of b and B-1-b."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    K = KV * VEC
    out_stride = out_stride_v * VEC
    one = Hf * 0.0 + 1.0  # a runtime 1.0 (a literal would become a constexpr inside the helpers)
    zero = b * 0
    a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw = _rows.geometry(
        affine_ptr, b, Hf, Wf, one, one, EPS, MAX_S)
    n_lanes = sy * sx * (4 * KTOP)
    scr = scr_ptr + b.to(tl.int64) * K
    n_bad = 0
    for g0 in range(part * CHUNK, n_lanes, SPLIT * CHUNK):
        g = g0 + tl.arange(0, CHUNK)
        cls, score, ok, bad = _rows.lanes(values_ptr, indices_ptr, b, g, zero, zero, H, W, K, Hf, Wf,
                                          a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw, KTOP)
        tl.atomic_add(scr + cls, score, mask=ok, sem="relaxed")
        n_bad += tl.sum(bad.to(tl.int32), axis=0)
    if n_bad > 0:
        tl.atomic_add(nbad_ptr + b, n_bad, sem="relaxed")
    partner = b
    if MIX != 0:
        partner = B - 1 - b
    pair = tl.minimum(b, partner)
    expected = tl.where(partner == b, SPLIT, 2 * SPLIT)
    tl.debug_barrier()  # every thread's atomics are issued before the ticket releases them
    done = tl.atomic_add(ticket_ptr + pair, 1, sem="acq_rel") + 1
    if done == expected:
        tl.debug_barrier()
        other = B - 1 - pair
        _finish_class_pair(scr_ptr, nbad_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, pair, other,
                           out_ptr, out_stride, K, GH, GW, GHf, GWf, Kf, smoothing, MIX, BLOCK_K)


@triton.jit
def _dense_stats(scr, K, BLOCK_K: tl.constexpr):
    """(max, sum exp(x - max)) of scr[0:K], read from L2 (it was built by other programs' atomics)."""
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
def _finish_class_pair(scr_ptr, nbad_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, a, p,
                       out_ptr, out_stride, K, GH, GW, GHf, GWf, Kf, smoothing,
                       MIX: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write class rows a and p (= B-1-a; the same row when MIX is 0 or a == p)."""
    scr_a = scr_ptr + a.to(tl.int64) * K
    scr_p = scr_ptr + p.to(tl.int64) * K
    spread = smoothing / Kf
    m_a, z_a = _dense_stats(scr_a, K, BLOCK_K)
    keep_a = (1.0 - smoothing) / tl.where(tl.load(nbad_ptr + a, cache_modifier=".cg") > 0, float("nan"), z_a)
    out_a = out_ptr + a.to(tl.int64) * out_stride
    if MIX == 0:
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = tl.load(scr_a + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_a + offs, (tl.exp(x - m_a) * keep_a + spread).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        m_p, z_p = _dense_stats(scr_p, K, BLOCK_K)
        keep_p = (1.0 - smoothing) / tl.where(tl.load(nbad_ptr + p, cache_modifier=".cg") > 0, float("nan"), z_p)
        _r1, _c1, _r2, _c2, lam_a = _rows.mix_box(box_ptr, box_stride, br1, bc1, br2, bc2, a, GH, GW, GHf, GWf, MIX)
        _r1, _c1, _r2, _c2, lam_p = _rows.mix_box(box_ptr, box_stride, br1, bc1, br2, bc2, p, GH, GW, GHf, GWf, MIX)
        out_p = out_ptr + p.to(tl.int64) * out_stride
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            t_a = tl.exp(tl.load(scr_a + offs, mask=mask, other=0.0, cache_modifier=".cg") - m_a) * keep_a + spread
            t_p = tl.exp(tl.load(scr_p + offs, mask=mask, other=0.0, cache_modifier=".cg") - m_p) * keep_p + spread
            tl.store(out_a + offs, (lam_a * t_a + (1.0 - lam_a) * t_p).to(out_ptr.dtype.element_ty), mask=mask)
            if p != a:
                tl.store(out_p + offs, (lam_p * t_p + (1.0 - lam_p) * t_a).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def token_tile_kernel(
    values_ptr, indices_ptr, affine_ptr,   # [B, KTOP, H, W] scores / ids, [B, 2, 3] affines
    box_ptr, box_stride, br1, bc1, br2, bc2,  # MixToken box (see _rows.mix_box)
    out_ptr,     # [B, 1 + T, K] targets (rows 1.. written here)
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, CB: tl.constexpr, BLOCK_K: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, cdiv(T, TILE)): program (b, j) writes token rows j*TILE .. j*TILE + TILE - 1 of b."""
    b = tl.program_id(0)
    t0 = tl.program_id(1) * TILE
    K = KV * VEC
    T = GH * GW
    # Geometry once per program: the sample's own and (MixToken) its partner's.
    g00, g01, g02, g10, g11, g12, gsy, gsx, gisy, gisx, gigh, gigw = _rows.geometry(
        affine_ptr, b, Hf, Wf, GHf, GWf, EPS, MAX_S)
    partner = B - 1 - b
    p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx, pigh, pigw = g00, g01, g02, g10, g11, g12, gsy, gsx, \
        gisy, gisx, gigh, gigw
    if MIX != 0:
        p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx, pigh, pigw = _rows.geometry(
            affine_ptr, partner, Hf, Wf, GHf, GWf, EPS, MAX_S)
    r1, c1, r2, c2, lam = _rows.mix_box(box_ptr, box_stride, br1, bc1, br2, bc2, b, GH, GW, GHf, GWf, MIX)
    for i in range(TILE):
        tok = t0 + i
        if tok < T:
            rt, ct, inside = _rows.token_cell(tok, GW, r1, c1, r2, c2, MIX)
            src = tl.where(inside, partner, b)  # MixToken: the partner's clean target
            a00, a01, a02, a10, a11, a12, sy, sx, isy, isx = _rows.choose_geometry(
                inside, p00, p01, p02, p10, p11, p12, psy, psx, pisy, pisx,
                g00, g01, g02, g10, g11, g12, gsy, gsx, gisy, gisx)
            out_row = out_ptr + (b.to(tl.int64) * (T + 1) + 1 + tok) * K
            n_live = sy * sx * (4 * KTOP)
            if n_live <= BLOCK_N:
                cls, score, ok, bad = _rows.lanes(values_ptr, indices_ptr, src, tl.arange(0, BLOCK_N), rt, ct,
                                                  H, W, K, Hf, Wf, a00, a01, a02, a10, a11, a12, sy, sx,
                                                  isy, isx, gigh, gigw, KTOP)
                total, first = _rows.pair_totals(cls, score, n_live, BLOCK_N, CB)
                t_touch, r = _rows.sparse_softmax(total, first, tl.sum(bad.to(tl.int32), axis=0), K, Kf, smoothing)
                _rows.fill_row(out_row, r, K, BLOCK_K)
                tl.debug_barrier()  # the dense fill lands before the touched classes overwrite it
                tl.store(out_row + cls, t_touch.to(out_ptr.dtype.element_ty), mask=first)
            tl.debug_barrier()



@triton.jit(do_not_specialize=["br1", "bc1", "br2", "bc2"])
def token_long_rows_kernel(
    values_ptr, indices_ptr, affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, out_ptr,
    B, KV, H, W, GH, GW, Hf, Wf, GHf, GWf, Kf, smoothing,
    KTOP: tl.constexpr, MIX: tl.constexpr, VEC: tl.constexpr, TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, CB: tl.constexpr, BLOCK_K: tl.constexpr, EPS: tl.constexpr, MAX_S: tl.constexpr,
):
    """Grid (B, cdiv(T, TILE)): the token rows of b whose lane list exceeds BLOCK_N (large maps over
    small grids), which token_tile_kernel leaves out; a program whose sample has no such row exits
    after its geometry. A separate kernel keeps this path's registers out of the tile kernel."""
    b = tl.program_id(0)
    t0 = tl.program_id(1) * TILE
    K = KV * VEC
    T = GH * GW
    if _rows.has_long_rows(affine_ptr, b, B, Hf, Wf, GHf, GWf, KTOP, MIX, BLOCK_N, EPS, MAX_S):
        for tok in range(t0, tl.minimum(t0 + TILE, T)):
            rt, ct, src, a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw = _rows.token_source(
                affine_ptr, box_ptr, box_stride, br1, bc1, br2, bc2, b, tok, B, GH, GW, Hf, Wf, GHf, GWf,
                MIX, EPS, MAX_S)
            n_live = sy * sx * (4 * KTOP)
            if n_live > BLOCK_N:
                out_row = out_ptr + (b.to(tl.int64) * (T + 1) + 1 + tok) * K
                m, keep, r = _rows.general_row(values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, Kf, smoothing,
                                               a00, a01, a02, a10, a11, a12, sy, sx, isy, isx, igh, igw,
                                               KTOP, BLOCK_N, CB)
                _rows.fill_row(out_row, r, K, BLOCK_K)
                tl.debug_barrier()
                for g0 in range(0, n_live, BLOCK_N):
                    cls, total, first = _rows.general_block(
                        values_ptr, indices_ptr, src, rt, ct, H, W, K, Hf, Wf, a00, a01, a02, a10, a11, a12,
                        sy, sx, isy, isx, igh, igw, g0, KTOP, BLOCK_N, CB)
                    t_touch = tl.exp(total - m) * keep + smoothing / Kf
                    tl.store(out_row + cls, t_touch.to(out_ptr.dtype.element_ty), mask=first)
                tl.debug_barrier()

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


def vector_width(num_classes: int, element_size: int) -> int:
    """The largest power of two dividing K with at most 16 bytes of ``element_size`` elements."""
    vec = 1
    while vec * 2 * element_size <= 16 and num_classes % (vec * 2) == 0:
        vec *= 2
    return vec


def lane_block(topk: int) -> int:
    """Lanes of one token row held in registers: a token of 2 x 2 samples (4 * 4 * k lanes), at
    least 32; longer rows take the general path."""
    return max(32, min(256, triton.next_power_of_2(16 * topk)))


def class_split(topk: int, h: int, w: int, chunk: int) -> int:
    """Programs per class row: a whole-map crop has about H * W samples of 4 * k lanes."""
    return max(1, min(16, -(-(h * w * 4 * topk) // (2 * chunk))))


def block_k(num_classes: int) -> int:
    return max(16, min(triton.next_power_of_2(num_classes), 1024))


def geometry_args(values: torch.Tensor, grid: tuple[int, int], num_classes: int, smoothing: float):
    """The runtime scalars every kernel takes after B: KV and the map / grid sizes (VEC excluded)."""
    bsz, topk, h, w = values.shape
    return bsz, h, w, grid[0], grid[1], float(h), float(w), float(grid[0]), float(grid[1]), \
        float(num_classes), float(smoothing)


def launch_class_rows(values, indices, affine, mix: MixSpec, out: torch.Tensor, out_stride: int, *,
                      num_classes: int, grid: tuple[int, int], smoothing: float, vec: int,
                      launch: Launch = DEFAULT_LAUNCH) -> None:
    """Class rows of every sample into ``out`` (row b at ``out + b * out_stride``, a multiple of
    ``vec``), no host sync."""
    bsz, topk, h, w = values.shape
    split = launch.class_split or class_split(topk, h, w, launch.class_chunk)
    work = torch.zeros(bsz * num_classes + 2 * bsz, dtype=torch.int32, device=values.device)
    scr = work[: bsz * num_classes].view(torch.float32)
    nbad = work[bsz * num_classes: bsz * num_classes + bsz]
    ticket = work[bsz * num_classes + bsz:]
    box = mix.tensor if mix.tensor is not None else nbad
    b, hh, ww, gh, gw, hf, wf, ghf, gwf, kf, sm = geometry_args(values, grid, num_classes, smoothing)
    class_rows_kernel[(bsz, split)](
        values, indices, affine, box, mix.stride, *mix.scalars, scr, nbad, ticket, out, out_stride // vec,
        b, num_classes // vec, hh, ww, gh, gw, hf, wf, ghf, gwf, kf, sm, split,
        KTOP=topk, MIX=mix.mode, VEC=vec, BLOCK_K=block_k(num_classes), CHUNK=launch.class_chunk,
        EPS=EXTENT_EPS, MAX_S=float(MAX_SAMPLES_PER_AXIS), num_warps=launch.class_warps,
    )


def launch_token_rows(values, indices, affine, mix: MixSpec, out: torch.Tensor, *, num_classes: int,
                      grid: tuple[int, int], smoothing: float, vec: int, launch: Launch = DEFAULT_LAUNCH) -> None:
    """Token rows 1.. of ``out [B, 1 + T, K]``: the tile kernel, then the long-row kernel."""
    bsz, topk = values.shape[:2]
    tokens = grid[0] * grid[1]
    block_n = lane_block(topk)
    box = mix.tensor if mix.tensor is not None else out
    token_tile_kernel[(bsz, triton.cdiv(tokens, launch.tile))](
        values, indices, affine, box, mix.stride, *mix.scalars, out,
        bsz, num_classes // vec, *geometry_args(values, grid, num_classes, smoothing)[1:],
        KTOP=topk, MIX=mix.mode, VEC=vec, TILE=launch.tile, BLOCK_N=block_n, CB=min(16, block_n),
        BLOCK_K=block_k(num_classes), EPS=EXTENT_EPS, MAX_S=float(MAX_SAMPLES_PER_AXIS), num_warps=launch.warps,
    )
    token_long_rows_kernel[(bsz, triton.cdiv(tokens, LONG_ROW_TILE))](
        values, indices, affine, box, mix.stride, *mix.scalars, out,
        bsz, num_classes // vec, *geometry_args(values, grid, num_classes, smoothing)[1:],
        KTOP=topk, MIX=mix.mode, VEC=vec, TILE=LONG_ROW_TILE, BLOCK_N=block_n, CB=LONG_ROW_CB,
        BLOCK_K=block_k(num_classes), EPS=EXTENT_EPS, MAX_S=float(MAX_SAMPLES_PER_AXIS), num_warps=launch.warps,
    )


def _checked_inputs(values, indices, affine, num_classes: int, grid: Sequence[int], out_dtype: torch.dtype):
    """``(grid, values, indices, affine)`` validated and contiguous, or a clear error."""
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] <= 0 or grid[1] <= 0:
        raise ValueError(f"grid must be positive; got {grid}")
    check_maps(values, indices, affine, num_classes)
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16; got {out_dtype}")
    return grid, values.contiguous(), indices.contiguous(), affine.contiguous()


def token_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32, launch: Launch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """Token targets ``[B, 1 + Gh*Gw, K]`` (``out_dtype``): a memset, the class-row kernel, the
    token-tile kernel and the long-row kernel, no host synchronization.

    values [B, k, H, W] float16 scores; indices [B, k, H, W] int16/int32 class ids; affine [B, 2, 3]
    (normalized output -> source); mix_box None, ``(r1, c1, r2, c2)`` or ``[B, 4]``. Semantics:
    ``tl_fast.ops.reference.token_targets``. ``launch`` sets launch parameters (never the results).
    """
    grid, values, indices, affine = _checked_inputs(values, indices, affine, num_classes, grid, out_dtype)
    bsz = values.shape[0]
    tokens = grid[0] * grid[1]
    out = torch.empty(bsz, 1 + tokens, num_classes, dtype=out_dtype, device=values.device)
    mix = mix_spec(mix_box, bsz, values.device)
    vec = vector_width(num_classes, out.element_size())
    launch_class_rows(values, indices, affine, mix, out, (1 + tokens) * num_classes, num_classes=num_classes,
                      grid=grid, smoothing=smoothing, vec=vec, launch=launch)
    launch_token_rows(values, indices, affine, mix, out, num_classes=num_classes, grid=grid, smoothing=smoothing,
                      vec=vec, launch=launch)
    return out


def class_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32, launch: Launch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """The class rows alone, ``[B, K]`` (row 0 of :func:`token_targets`): the class-row kernel writing
    into a ``[B, K]`` output, for models without token outputs. ``grid`` only sizes the MixToken
    box's area."""
    grid, values, indices, affine = _checked_inputs(values, indices, affine, num_classes, grid, out_dtype)
    out = torch.empty(values.shape[0], num_classes, dtype=out_dtype, device=values.device)
    vec = vector_width(num_classes, out.element_size())
    launch_class_rows(values, indices, affine, mix_spec(mix_box, values.shape[0], values.device), out, num_classes,
                      num_classes=num_classes, grid=grid, smoothing=smoothing, vec=vec, launch=launch)
    return out


def interpreted() -> bool:
    """Whether this module's kernels were decorated under ``TRITON_INTERPRET=1`` (CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(token_tile_kernel, InterpretedFunction)


__all__ = ["token_targets", "class_targets", "Launch", "DEFAULT_LAUNCH", "mix_spec", "MixSpec", "check_maps",
           "vector_width", "lane_block", "class_split", "block_k", "launch_class_rows", "launch_token_rows",
           "interpreted", "EXTENT_EPS"]
