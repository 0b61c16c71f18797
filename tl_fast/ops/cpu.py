"""Fast CPU token and class targets: one numba pass over the compressed top-k maps (docs/spec.md section 3).

The same functions as :func:`tl_fast.ops.reference.token_targets` and
:func:`~tl_fast.ops.reference.class_targets` (the oracle; tests compare them), computed row by row
instead of in batch-wide tensor operations:

* a sample's geometry (the widened affine and its adaptive sample counts) is computed once;
* each output row walks its RoI-Align samples, their four bilinear corners and the ``k`` (score,
  class) pairs of each corner, adding the weighted scores of the classes it touches into a small
  accumulator (the few touched classes are listed, the other ``K - n`` all score 0);
* the softmax needs only those ``n`` scores: every untouched class gets the same share
  ``exp(-m) / Z``, so a row is written as one constant fill followed by ``n`` scattered values.

The order of the additions is the reference's (sample, corner, then top-k entry; token scores in
float32, class-token scores in float64), and the softmax, smoothing and MixToken mix run in float64,
so results agree with the reference to float32 rounding. bfloat16 and float16 rows are rounded from
float32 to nearest even, as ``Tensor.copy_`` does.

Work is split over the batch: each task owns a range of samples and their MixToken partners
(sample ``b`` pairs with ``B - 1 - b``), so a task needs no other task's class rows. The calling
thread and ``torch.get_num_threads() - 1`` pool threads (the compiled code releases the GIL) claim
tasks from a shared counter: no spinning, no barrier per operation, and a thread on a busy core
simply ends up doing fewer tasks. Inputs the fast path does not cover bit for bit — non-finite scores or
affines, class ids out of range, output dtypes other than float32/bfloat16/float16 — are handed to
the reference, which defines what they produce (NaN rows, or its error message).

The class-token-only targets (:func:`class_targets`) are the same class rows alone, without the token
rows: one task per range of samples, then the reference's MixToken mix and dtype conversion.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numba
import numpy as np
import torch

from ..memory import new_output
from . import reference

_OUT_MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_EXTENT_EPS = reference.EXTENT_EPS

# Status codes a task returns (0 = fine): the wrapper then lets the reference handle the batch.
_BAD_VALUE = 1  # a non-finite score
_BAD_CLASS = 2  # a class id outside [0, K)


# --------------------------------------------------------------------------------------------
# numba kernels


@numba.njit(cache=True, nogil=True)
def _geometry(aff, h, w, gh, gw, geo):
    """Widen one sample's affine (``aligned=False`` edge rule) and count its samples per bin.

    ``geo`` gets ``a00 a01 a02 a10 a11 a12, Sy, Sx`` (token grid), ``Sy, Sx`` (class token); the
    arithmetic is :func:`reference.widened_affine` and :func:`reference.sample_counts` in order."""
    a = aff.copy()
    for col in range(2):
        length = math.sqrt((a[0, col] * w) ** 2 + (a[1, col] * h) ** 2)
        d = min(length, 1.0)
        d = max(d, 1e-12)
        a[0, col] = a[0, col] / d
        a[1, col] = a[1, col] / d
    ext_u = math.sqrt((a[0, 0] * w) ** 2 + (a[1, 0] * h) ** 2)
    ext_v = math.sqrt((a[0, 1] * w) ** 2 + (a[1, 1] * h) ** 2)
    geo[0] = a[0, 0]
    geo[1] = a[0, 1]
    geo[2] = a[0, 2]
    geo[3] = a[1, 0]
    geo[4] = a[1, 1]
    geo[5] = a[1, 2]
    geo[6] = max(math.ceil(ext_v / gh - _EXTENT_EPS), 1.0)
    geo[7] = max(math.ceil(ext_u / gw - _EXTENT_EPS), 1.0)
    geo[8] = max(math.ceil(ext_v - _EXTENT_EPS), 1.0)
    geo[9] = max(math.ceil(ext_u - _EXTENT_EPS), 1.0)


@numba.njit(cache=True, nogil=True)
def _accumulate_bin(lv, li, s, g, h, w, r, c, gh, gw, sy, sx, acc, mark, tag, touched):
    """Add the weighted scores of bin ``(r, c)`` of a ``gh x gw`` grid over sample ``s``'s output
    into ``acc`` (float32 or float64, the precision of the sum); returns how many distinct classes
    it touched (listed in ``touched[:n]``, ``mark[class] == tag``)."""
    n = 0
    fsy = float(sy)
    fsx = float(sx)
    count = fsy * fsx
    for j in range(sy):
        v = (r + (j + 0.5) / fsy) / gh
        for i in range(sx):
            u = (c + (i + 0.5) / fsx) / gw
            py = (g[3] * u + g[4] * v + g[5]) * h - 0.5
            px = (g[0] * u + g[1] * v + g[2]) * w - 0.5
            if py < -1.0 or py > h or px < -1.0 or px > w:
                continue  # RoI-Align's border rule: the sample contributes 0
            y = max(py, 0.0)
            x = max(px, 0.0)
            y_low = int(math.floor(y))
            x_low = int(math.floor(x))
            if y_low >= h - 1:
                y_low = h - 1
                y_high = y_low
                y = float(y_low)
            else:
                y_high = y_low + 1
            if x_low >= w - 1:
                x_low = w - 1
                x_high = x_low
                x = float(x_low)
            else:
                x_high = x_low + 1
            ly = y - y_low
            lx = x - x_low
            hy = 1.0 - ly
            hx = 1.0 - lx
            for corner in range(4):
                if corner == 0:
                    wgt, pix = hy * hx, y_low * w + x_low
                elif corner == 1:
                    wgt, pix = hy * lx, y_low * w + x_high
                elif corner == 2:
                    wgt, pix = ly * hx, y_high * w + x_low
                else:
                    wgt, pix = ly * lx, y_high * w + x_high
                wf = np.float32(wgt / count)
                if wf == 0:
                    continue  # adds 0 in the reference (finite inputs only reach this code)
                for q in range(lv.shape[2]):
                    cls = li[s, pix, q]
                    contrib = lv[s, pix, q] * wf  # float32 product, as the reference's
                    if mark[cls] != tag:
                        mark[cls] = tag
                        touched[n] = cls
                        n += 1
                        acc[cls] = contrib
                    else:
                        acc[cls] += contrib
    return n


@numba.njit(cache=True, nogil=True)
def _softmax_sparse(acc, touched, n, num_classes, keep, spread, prob):
    """Softmax over all K classes of a row whose only non-zero scores are ``acc[touched[:n]]``,
    then smoothing; ``prob[:n]`` gets the touched classes' targets, the return value is the
    target of every untouched class."""
    m = -np.inf
    for t in range(n):
        m = max(m, float(acc[touched[t]]))
    if n < num_classes:
        m = max(m, 0.0)
    z = 0.0
    for t in range(n):
        e = math.exp(float(acc[touched[t]]) - m)
        prob[t] = e
        z += e
    rest = math.exp(-m)
    z += (num_classes - n) * rest
    for t in range(n):
        prob[t] = prob[t] / z * keep + spread
    return rest / z * keep + spread


@numba.njit(cache=True, nogil=True)
def _f32_bits(x, scratch32, scratch_bits):
    scratch32[0] = np.float32(x)
    return np.int64(scratch_bits[0])


@numba.njit(cache=True, nogil=True)
def _half_bits(x, mode, scratch32, scratch_bits):
    """IEEE float32 -> bfloat16 (mode 1) or float16 (mode 2) bits, round to nearest even."""
    u = _f32_bits(x, scratch32, scratch_bits)
    if mode == 1:
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return 0x7FC0
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00
    if a >= 0x477FF000:  # >= 65520 rounds to infinity
        return sign | 0x7C00
    if a >= 0x38800000:  # a normal float16
        a = a + 0xC8000FFF + ((a >> 13) & 1)  # rebias the exponent (-112 << 23) and round
        return sign | ((a >> 13) & 0xFFFF)
    if a < 0x33000000:  # at most half the smallest subnormal: rounds to zero
        return sign
    mant = (a & 0x7FFFFF) | 0x800000
    shift = 126 - (a >> 23)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@numba.njit(cache=True, nogil=True)
def _write_row(out32, out16, b, row, fill, touched, prob, n, mode, scratch32, scratch_bits):
    """Row ``out[b, row]``: ``fill`` everywhere, then the ``n`` touched classes."""
    if mode == 0:
        o = out32[b, row]
        f = np.float32(fill)
        for c in range(o.shape[0]):
            o[c] = f
        for t in range(n):
            o[touched[t]] = np.float32(prob[t])
    else:
        o16 = out16[b, row]
        fb = np.uint16(_half_bits(fill, mode, scratch32, scratch_bits))
        for c in range(o16.shape[0]):
            o16[c] = fb
        for t in range(n):
            o16[touched[t]] = np.uint16(_half_bits(prob[t], mode, scratch32, scratch_bits))


@numba.njit(cache=True, nogil=True)
def _load_map(vals16, vals32, use16, table, idx, b, num_classes, lv, li, m):
    """Sample ``b``'s map into ``lv[m], li[m]`` (``[H*W, k]``: one corner's k pairs adjacent), checked:
    returns 0, or the status code of a non-finite score or a class id outside ``[0, K)``."""
    for q in range(idx.shape[1]):
        for p in range(idx.shape[2]):
            val = table[vals16[b, q, p]] if use16 else vals32[b, q, p]
            if not np.isfinite(val):
                return _BAD_VALUE
            cls = np.int64(idx[b, q, p])
            if cls < 0 or cls >= num_classes:
                return _BAD_CLASS
            lv[m, p, q] = val
            li[m, p, q] = cls
    return 0


@numba.njit(cache=True, nogil=True)
def _class_row(lv, li, m, g, h, w, num_classes, keep, spread, acc64, mark, tag, touched, prob, row):
    """The class token's smoothed target of member ``m`` (one bin over the whole output, scores
    summed in float64), densely into ``row`` (float64 ``[K]``), before any MixToken mix."""
    n = _accumulate_bin(lv, li, m, g, h, w, 0.0, 0.0, 1, 1, int(g[8]), int(g[9]), acc64, mark, tag, touched)
    fill = _softmax_sparse(acc64, touched, n, num_classes, keep, spread, prob)
    for c in range(num_classes):
        row[c] = fill
    for t in range(n):
        row[touched[t]] = prob[t]


@numba.njit(cache=True, nogil=True)
def _targets_task(lo, hi, vals16, vals32, use16, table, idx, h, w, affine, boxes, has_mix, gh, gw,
                  num_classes, keep, spread, mode, out32, out16):
    """Targets of samples ``[lo, hi)`` and of their MixToken partners ``[B - hi, B - lo)``.

    vals16 [B, k, H*W] uint16 (float16 bits, read through ``table``) or vals32 [B, k, H*W] float32
    (``use16`` says which); idx [B, k, H*W] class ids; affine [B, 2, 3] float64; boxes [B, 4] int64
    (r1, c1, r2, c2; read when ``has_mix``); out32 / out16 [B, 1 + gh*gw, K] float32 / 16-bit
    (``mode``: 0 f32, 1 bf16, 2 f16; the other one is a dummy). Returns 0, or a status code when an
    input needs the reference (then the rows written so far are garbage)."""
    if hi <= lo:
        return 0
    bsz = affine.shape[0]
    topk = idx.shape[1]
    hw = idx.shape[2]
    tokens = gh * gw
    # The samples this task owns: its range and the partners' range (they meet at the middle).
    members = np.empty(2 * (hi - lo), np.int64)
    n_mem = 0
    for b in range(lo, hi):
        members[n_mem] = b
        n_mem += 1
    for b in range(max(bsz - hi, hi), bsz - lo):
        members[n_mem] = b
        n_mem += 1
    local = np.full(bsz, -1, np.int64)
    for m in range(n_mem):
        local[members[m]] = m

    # Each member's map, transposed to [H*W, k] so one corner's k pairs are adjacent; checked.
    lv = np.empty((n_mem, hw, topk), np.float32)
    li = np.empty((n_mem, hw, topk), np.int32)
    geo = np.empty((n_mem, 10), np.float64)
    for m in range(n_mem):
        b = members[m]
        status = _load_map(vals16, vals32, use16, table, idx, b, num_classes, lv, li, m)
        if status:
            return status
        _geometry(affine[b], h, w, gh, gw, geo[m])

    acc32 = np.zeros(num_classes, np.float32)
    acc64 = np.zeros(num_classes, np.float64)
    mark = np.full(num_classes, -1, np.int64)
    touched = np.empty(num_classes, np.int64)
    prob = np.empty(num_classes, np.float64)
    scratch32 = np.empty(1, np.float32)
    scratch_bits = scratch32.view(np.uint32)
    tag = 0

    # Class-token targets of every member (softmax + smoothing, float64, dense).
    cls_t = np.empty((n_mem, num_classes), np.float64)
    for m in range(n_mem):
        _class_row(lv, li, m, geo[m], h, w, num_classes, keep, spread, acc64, mark, tag, touched, prob, cls_t[m])
        tag += 1

    for m in range(n_mem):
        b = members[m]
        mp = local[bsz - 1 - b]
        r1, c1, r2, c2 = 0, 0, 0, 0
        if has_mix:
            r1, c1, r2, c2 = boxes[b, 0], boxes[b, 1], boxes[b, 2], boxes[b, 3]
        # Row 0: the class token, mixed with the partner's by lam = 1 - box area / tokens.
        if has_mix:
            area = max(min(r2, gh) - max(r1, 0), 0) * max(min(c2, gw) - max(c1, 0), 0)
            lam = 1.0 - area / tokens
            for c in range(num_classes):
                prob[c] = lam * cls_t[m, c] + (1.0 - lam) * cls_t[mp, c]
        else:
            for c in range(num_classes):
                prob[c] = cls_t[m, c]
        if mode == 0:
            o = out32[b, 0]
            for c in range(num_classes):
                o[c] = np.float32(prob[c])
        else:
            o16 = out16[b, 0]
            for c in range(num_classes):
                o16[c] = np.uint16(_half_bits(prob[c], mode, scratch32, scratch_bits))
        # Token rows: inside the box they are the partner's rows at the same position.
        for r in range(gh):
            for c in range(gw):
                src = mp if (has_mix and r1 <= r < r2 and c1 <= c < c2) else m
                g = geo[src]
                n = _accumulate_bin(lv, li, src, g, h, w, float(r), float(c), gh, gw, int(g[6]), int(g[7]),
                                    acc32, mark, tag, touched)
                tag += 1
                fill = _softmax_sparse(acc32, touched, n, num_classes, keep, spread, prob)
                _write_row(out32, out16, b, 1 + r * gw + c, fill, touched, prob, n, mode, scratch32, scratch_bits)
    return 0


@numba.njit(cache=True, nogil=True)
def _class_task(lo, hi, vals16, vals32, use16, table, idx, h, w, affine, num_classes, keep, spread, rows):
    """Class-token targets of samples ``[lo, hi)`` into ``rows`` (float64 ``[B, K]``), smoothed but not
    mixed (arguments as in :func:`_targets_task`). Returns 0, or a status code when an input needs
    the reference."""
    hw = idx.shape[2]
    lv = np.empty((1, hw, idx.shape[1]), np.float32)
    li = np.empty((1, hw, idx.shape[1]), np.int32)
    geo = np.empty(10, np.float64)
    acc64 = np.zeros(num_classes, np.float64)
    mark = np.full(num_classes, -1, np.int64)
    touched = np.empty(num_classes, np.int64)
    prob = np.empty(num_classes, np.float64)
    for b in range(lo, hi):
        status = _load_map(vals16, vals32, use16, table, idx, b, num_classes, lv, li, 0)
        if status:
            return status
        _geometry(affine[b], h, w, 1, 1, geo)
        _class_row(lv, li, 0, geo, h, w, num_classes, keep, spread, acc64, mark, b - lo, touched, prob, rows[b])
    return 0


# --------------------------------------------------------------------------------------------
# host side

_POOL_LOCK = threading.Lock()
_POOL: dict = {}  # (pid, helpers) -> ThreadPoolExecutor; a forked child builds its own
_COMPILED: set = set()  # argument type keys already compiled in this process
TASKS_PER_THREAD = 8  # small tasks, so a thread on a busy core ends up doing fewer of them


def _forget_parent_pools() -> None:
    """In a forked child (a data-loader worker) the parent's pool threads do not exist; start afresh."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOL.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_pools)


def _pool(helpers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), helpers)
    with _POOL_LOCK:
        pool = _POOL.get(key)
        if pool is None:
            pool = _POOL[key] = ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="tl_fast_cpu")
        return pool


def _run_tasks(run: Callable[[int], int], n_tasks: int, threads: int) -> list[int]:
    """``run(i)`` for every task ``i``, on the calling thread plus ``threads - 1`` pool threads.

    Tasks are claimed from a shared counter; the caller works too and then waits only for tasks a
    helper has claimed, never for a helper to wake up: on a loaded host a helper that is scheduled
    late finds nothing left and the call does not wait for it."""
    status: list = [0] * n_tasks
    done = [threading.Event() for _ in range(n_tasks)]
    claims = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while True:
            i = next(claims)
            if i >= n_tasks:
                return
            try:
                status[i] = run(i)
            except BaseException as exc:  # re-raised in the caller
                status[i] = exc
            finally:
                done[i].set()

    helpers = min(threads, n_tasks) - 1
    if helpers > 0:
        pool = _pool(helpers)
        for _ in range(helpers):
            pool.submit(work)
    work()
    for event in done:
        event.wait()
    for s in status:
        if isinstance(s, BaseException):
            raise s
    return status


def _mix_boxes(mix_box, bsz: int) -> Optional[np.ndarray]:
    if mix_box is None:
        return None
    return reference.mix_boxes(mix_box, bsz).cpu().numpy().astype(np.int64)


def token_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32, threads: Optional[int] = None,
) -> torch.Tensor:
    """Token targets ``[B, 1 + Gh*Gw, K]`` on CPU; same arguments and result as
    :func:`tl_fast.ops.reference.token_targets`.

    ``threads`` defaults to ``torch.get_num_threads()``."""
    grid = (int(grid[0]), int(grid[1]))
    aff = _checked_affine(values, indices, affine, num_classes)
    mode = _OUT_MODES.get(out_dtype)
    boxes = _mix_boxes(mix_box, values.shape[0])  # validates the box as the reference does
    if mode is None or not np.isfinite(aff).all():
        return _reference(values, indices, affine, num_classes, grid, smoothing, mix_box, out_dtype)

    bsz, topk, h, w = values.shape
    vals16, vals32, use16, idx = _map_arrays(values, indices)
    out = new_output((bsz, 1 + grid[0] * grid[1], num_classes), out_dtype, torch.device("cpu"))
    if mode == 0:
        out32, out16 = out.numpy(), np.zeros((1, 1, 1), np.uint16)
    else:
        out32, out16 = np.zeros((1, 1, 1), np.float32), out.view(torch.int16).numpy().view(np.uint16)
    keep, spread = 1.0 - float(smoothing), float(smoothing) / num_classes

    def task(lo: int, hi: int) -> int:
        return _targets_task(lo, hi, vals16, vals32, use16, _F16_TO_F32, idx, h, w, aff,
                             boxes if boxes is not None else np.zeros((1, 4), np.int64), boxes is not None,
                             grid[0], grid[1], num_classes, keep, spread, mode, out32, out16)

    # Each task owns samples and their partners: split the first half of the batch.
    status = _run_split(task, (bsz + 1) // 2, threads, ("targets", idx.dtype.str, mode))
    if any(status):  # a non-finite score or a class id out of range: the reference's behaviour
        return _reference(values, indices, affine, num_classes, grid, smoothing, mix_box, out_dtype)
    return out


def class_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    smoothing: float = 0.0, mix_box=None, grid: Sequence[int] = (14, 14), out_dtype: torch.dtype = torch.float32,
    smoothing_rule: str = "tl_fast", threads: Optional[int] = None,
) -> torch.Tensor:
    """Class-token targets ``[B, K]`` on CPU (row 0 of :func:`token_targets`, alone); same arguments and
    result as :func:`tl_fast.ops.reference.class_targets`.

    Each sample's smoothed target is computed as the class row of :func:`token_targets` (float64); the
    MixToken mix and the conversion to ``out_dtype`` are the reference's own."""
    from ..compat import smoothing_terms

    grid = (int(grid[0]), int(grid[1]))
    aff = _checked_affine(values, indices, affine, num_classes)
    keep, spread = smoothing_terms(smoothing, num_classes, smoothing_rule)
    if not np.isfinite(aff).all():
        return _reference_class(values, indices, affine, num_classes, grid, smoothing, mix_box, out_dtype,
                                smoothing_rule)
    bsz, _, h, w = values.shape
    vals16, vals32, use16, idx = _map_arrays(values, indices)
    rows = np.empty((bsz, num_classes), np.float64)

    def task(lo: int, hi: int) -> int:
        return _class_task(lo, hi, vals16, vals32, use16, _F16_TO_F32, idx, h, w, aff, num_classes, keep, spread,
                           rows)

    if any(_run_split(task, bsz, threads, ("class", idx.dtype.str))):
        return _reference_class(values, indices, affine, num_classes, grid, smoothing, mix_box, out_dtype,
                                smoothing_rule)
    return reference.mix_class_rows(torch.from_numpy(rows), mix_box, grid).to(out_dtype)


def _checked_affine(values, indices, affine, num_classes: int) -> np.ndarray:
    """The reference's shape checks and CPU tensors only; the affine as contiguous float64."""
    reference.check_inputs(values, indices, affine, num_classes, ids=False)
    for name, t in (("values", values), ("indices", indices), ("affine", affine)):
        if t.device.type != "cpu":
            raise ValueError(f"tl_fast.ops.cpu needs CPU tensors; {name} is on {t.device} (use impl='auto')")
    return np.ascontiguousarray(affine.detach().to(torch.float64).numpy())


def _map_arrays(values: torch.Tensor, indices: torch.Tensor):
    """``(vals16, vals32, use16, idx)``: the maps as ``[B, k, H*W]`` arrays for the numba tasks (float16
    scores as their bits, other dtypes as float32; the array not in use is a dummy)."""
    bsz, topk, h, w = values.shape
    values = values.detach().contiguous().view(bsz, topk, h * w)
    indices = indices.detach().contiguous().view(bsz, topk, h * w)
    use16 = values.dtype == torch.float16
    if use16:
        vals16, vals32 = values.view(torch.int16).numpy().view(np.uint16), np.zeros((1, 1, 1), np.float32)
    else:
        vals16, vals32 = np.zeros((1, 1, 1), np.uint16), values.to(torch.float32).numpy()
    if indices.dtype not in (torch.int16, torch.int32):  # one compiled kernel per id type: keep it to two
        indices = indices.to(torch.int32)
    return vals16, vals32, use16, indices.numpy()


def _run_split(task: Callable[[int, int], int], n: int, threads: Optional[int], key: tuple) -> list[int]:
    """``task(lo, hi)`` over ``[0, n)`` cut into small ranges, on ``threads`` threads (default
    ``torch.get_num_threads()``); ``key`` names the compiled specialization."""
    if key not in _COMPILED:  # compile (or load from numba's cache) here, not in a pool thread
        task(0, 0)
        _COMPILED.add(key)
    threads = max(1, torch.get_num_threads() if threads is None else int(threads))
    step = n if threads == 1 else max(1, -(-n // (threads * TASKS_PER_THREAD)))
    starts = range(0, n, step)
    return _run_tasks(lambda i: task(starts[i], min(starts[i] + step, n)), len(starts), threads)


def _reference(values, indices, affine, num_classes, grid, smoothing, mix_box, out_dtype):
    return reference.token_targets(values, indices, affine, num_classes=num_classes, grid=grid,
                                   smoothing=smoothing, mix_box=mix_box, out_dtype=out_dtype)


def _reference_class(values, indices, affine, num_classes, grid, smoothing, mix_box, out_dtype, smoothing_rule):
    return reference.class_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=smoothing,
                                   mix_box=mix_box, out_dtype=out_dtype, smoothing_rule=smoothing_rule)


__all__ = ["token_targets", "class_targets"]
