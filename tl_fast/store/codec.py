"""Record codec of the label store: encoder (one record), batched numba decoder, checksum.

The record layout is specified in :mod:`tl_fast.store.format`. The decoder runs over ``uint64`` words
(a view of the memory-mapped store, or of raw records handed over by a loader), writes straight into
preallocated output arrays and never runs Python per record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numba
import numpy as np
import torch

from .format import (
    LOSSY_CODE_BITS,
    MAX_FINITE_KEY,
    MIN_FINITE_KEY,
    RECORD_FORMAT,
    RECORD_HEADER_BYTES,
    SLOT_PARAM_BYTES,
    index_dtype_for,
)


class StoreError(ValueError):
    """A label store or record is malformed, corrupted, truncated or does not match what was asked."""


@dataclass
class TopKMaps:
    """A batch of top-k score maps: ``values`` [B, k, H, W] float16 and ``indices`` [B, k, H, W]
    class ids (int16 when K <= 32767, else int32). Unpacks like a tuple: ``values, indices = maps``."""

    values: torch.Tensor
    indices: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "TopKMaps":
        return TopKMaps(self.values.to(device, non_blocking=non_blocking),
                        self.indices.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TopKMaps":
        return TopKMaps(self.values.pin_memory(), self.indices.pin_memory())

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.values
        yield self.indices

    def __getitem__(self, item) -> "TopKMaps":
        """Select samples: ``maps[2:5]``, ``maps[idx_tensor]``."""
        return TopKMaps(self.values[item], self.indices[item])

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])

    @property
    def device(self) -> torch.device:
        return self.values.device


# --------------------------------------------------------------------------------------------
# numba kernels

_G = np.uint64(0x9E3779B97F4A7C15)
_M = np.uint64(0xFF51AFD7ED558CCD)
_LOW32 = np.uint64(0xFFFFFFFF)

# Decoder status codes (0 = fine); the Python side turns them into messages.
ERR_BOUNDS = 1
ERR_CHECKSUM = 2
ERR_INDEX_CHECKSUM = 3
ERR_FORMAT = 4
ERR_PALETTE = 5
ERR_ID_RANGE = 6
_ERR_TEXT = {
    ERR_BOUNDS: "record offset/length is out of bounds or misaligned",
    ERR_CHECKSUM: "record checksum mismatch (the record bytes are corrupted)",
    ERR_INDEX_CHECKSUM: "record checksum differs from the store index",
    ERR_FORMAT: "malformed record header or lengths (wrong map size / topk, or corrupted)",
    ERR_PALETTE: "palette class id out of range [0, num_classes) or not increasing",
    ERR_ID_RANGE: "packed class index outside the record's palette",
}


@numba.njit(cache=True, nogil=True, inline="always")
def _lane(h, w):
    h = (h ^ w) * _M
    return h ^ (h >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def _checksum(buf, o, m):
    """Checksum of the record of ``m`` words starting at word ``o`` of ``buf`` (see format docs)."""
    w0 = buf[o] & _LOW32
    seed = np.uint64(m) ^ w0
    h0 = (np.uint64(1) * _G) ^ seed
    h1 = (np.uint64(2) * _G) ^ seed
    h2 = (np.uint64(3) * _G) ^ seed
    h3 = (np.uint64(4) * _G) ^ seed
    i = 1
    while i + 4 <= m:
        h0 = _lane(h0, buf[o + i])
        h1 = _lane(h1, buf[o + i + 1])
        h2 = _lane(h2, buf[o + i + 2])
        h3 = _lane(h3, buf[o + i + 3])
        i += 4
    if i < m:
        h0 = _lane(h0, buf[o + i])
    if i + 1 < m:
        h1 = _lane(h1, buf[o + i + 1])
    if i + 2 < m:
        h2 = _lane(h2, buf[o + i + 2])
    h = np.uint64(0)
    for hl in (h0, h1, h2, h3):
        h = (h ^ hl) * _G
        h = h ^ (h >> np.uint64(29))
    return np.uint32((h ^ (h >> np.uint64(32))) & _LOW32)


@numba.njit(cache=True, nogil=True)
def _pack_bits(words, bitpos, vals, nbits):
    """Append ``vals`` (uint64, each < 2**nbits) LSB-first to ``words`` at bit ``bitpos``."""
    if nbits == 0:
        return bitpos
    for i in range(vals.shape[0]):
        v = np.uint64(vals[i])
        wi = bitpos >> 6
        sh = bitpos & 63
        words[wi] |= v << np.uint64(sh)
        if sh + nbits > 64:
            words[wi + 1] |= v >> np.uint64(64 - sh)
        bitpos += nbits
    return bitpos


@numba.njit(cache=True, nogil=True)
def _decode_batch(buf, offsets, lengths, expected, check_expected, num_classes, k, hw, out_vals, out_ids):
    """Decode records ``(offsets[r], lengths[r])`` (bytes into ``buf`` viewed as uint64) into
    ``out_vals[r]`` (uint16 float16 bits, [B, k*hw]) and ``out_ids[r]`` ([B, k*hw]).

    Returns ``(status, record)``: status 0 when every record decoded, else an ``ERR_*`` code and
    the position of the first bad record (outputs are then partly written and must be discarded)."""
    n = k * hw
    nbuf = buf.shape[0]
    pal = np.empty(max(n, 1), np.int64)
    for r in range(offsets.shape[0]):
        off = offsets[r]
        ln = lengths[r]
        if off < 0 or ln < RECORD_HEADER_BYTES + SLOT_PARAM_BYTES * k or (off & 7) != 0 or (ln & 7) != 0:
            return ERR_BOUNDS, r
        o = off >> 3
        m = ln >> 3
        if o + m > nbuf:
            return ERR_BOUNDS, r
        w0 = buf[o]
        stored = np.uint32(w0 >> np.uint64(32))
        if _checksum(buf, o, m) != stored:
            return ERR_CHECKSUM, r
        if check_expected and np.uint32(expected[r]) != stored:
            return ERR_INDEX_CHECKSUM, r
        fmt = np.int64(w0 & np.uint64(0xFF))
        b = np.int64((w0 >> np.uint64(8)) & np.uint64(0xFF))
        width = np.int64((w0 >> np.uint64(16)) & np.uint64(0xFF))
        w1 = buf[o + 1]
        npal = np.int64(w1 & _LOW32)
        nn = np.int64(w1 >> np.uint64(32))
        if fmt != RECORD_FORMAT or (width != 2 and width != 4) or nn != n or npal < 1 or npal > n:
            return ERR_FORMAT, r
        # minimal index width for the palette size
        need = 0
        while (1 << need) < npal:
            need += 1
        if b != need:
            return ERR_FORMAT, r
        valbits = 0
        for j in range(k):
            sp = buf[o + 2 + j]
            base = np.int64(sp & np.uint64(0xFFFF))
            top = np.int64((sp >> np.uint64(16)) & np.uint64(0xFFFF))
            step = np.int64((sp >> np.uint64(32)) & np.uint64(0xFFFF))
            bits = np.int64((sp >> np.uint64(48)) & np.uint64(0xFF))
            if base < MIN_FINITE_KEY or top > MAX_FINITE_KEY or base > top or step < 1 or bits > 16:
                return ERR_FORMAT, r
            valbits += bits * hw
        pal_words = (npal * width + 7) >> 3
        id_words = (n * b + 63) >> 6
        val_words = (valbits + 63) >> 6
        if 2 + k + pal_words + id_words + val_words != m:
            return ERR_FORMAT, r
        # palette
        po = o + 2 + k
        prev = -1
        for i in range(npal):
            if width == 2:
                e = np.int64((buf[po + (i >> 2)] >> np.uint64(16 * (i & 3))) & np.uint64(0xFFFF))
            else:
                e = np.int64((buf[po + (i >> 1)] >> np.uint64(32 * (i & 1))) & _LOW32)
            if e >= num_classes or e <= prev:
                return ERR_PALETTE, r
            pal[i] = e
            prev = e
        # class ids: b-bit palette indices
        wi = po + pal_words
        if b == 0:
            c0 = pal[0]
            for i in range(n):
                out_ids[r, i] = c0
        else:
            mask = (np.uint64(1) << np.uint64(b)) - np.uint64(1)
            ub = np.uint64(b)
            check_q = npal != (1 << b)  # with a full palette every b-bit index is valid
            acc = np.uint64(0)
            have = 0
            for i in range(n):
                if have >= b:
                    q = acc & mask
                    acc >>= ub
                    have -= b
                else:
                    w = buf[wi]
                    wi += 1
                    q = (acc | (w << np.uint64(have))) & mask
                    acc = w >> np.uint64(b - have)
                    have = 64 - (b - have)
                qi = np.int64(q)
                if check_q and qi >= npal:
                    return ERR_ID_RANGE, r
                out_ids[r, i] = pal[qi]
        # values: per-slot frame of reference over float16 order keys
        wi = po + pal_words + id_words
        acc = np.uint64(0)
        have = 0
        for j in range(k):
            sp = buf[o + 2 + j]
            base = np.int64(sp & np.uint64(0xFFFF))
            top = np.int64((sp >> np.uint64(16)) & np.uint64(0xFFFF))
            step = np.int64((sp >> np.uint64(32)) & np.uint64(0xFFFF))
            bits = np.int64((sp >> np.uint64(48)) & np.uint64(0xFF))
            half = base + (step - 1) // 2
            ob = j * hw
            if bits == 0:
                key = min(half, top)
                for i in range(hw):
                    out_vals[r, ob + i] = key
                continue
            mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
            ub = np.uint64(bits)
            for i in range(hw):
                if have >= bits:
                    q = acc & mask
                    acc >>= ub
                    have -= bits
                else:
                    w = buf[wi]
                    wi += 1
                    q = (acc | (w << np.uint64(have))) & mask
                    acc = w >> np.uint64(bits - have)
                    have = 64 - (bits - have)
                key = half + np.int64(q) * step
                if key > top:
                    key = top
                out_vals[r, ob + i] = key
        # order keys -> float16 bits, in a separate (vectorizable) pass: key ^ 0x8000 for keys >= 0x8000
        # (non-negative values), else 0xFFFF - key == key ^ 0xFFFF
        for i in range(n):
            x = out_vals[r, i]
            out_vals[r, i] = x ^ (np.uint16(0x8000) if x >= np.uint16(0x8000) else np.uint16(0xFFFF))
    return 0, -1


@numba.njit(cache=True, nogil=True)
def _gather_bytes(buf8, offsets, lengths, out):
    """Copy record bytes ``buf8[offsets[r]:offsets[r] + lengths[r]]`` into row r of ``out``."""
    for r in range(offsets.shape[0]):
        o = offsets[r]
        out[r, :lengths[r]] = buf8[o:o + lengths[r]]


@numba.njit(cache=True, nogil=True)
def _fill_record(words, k, hw, npal, b, width, flags, slot_base, slot_top, slot_step, slot_bits,
                 palette, inv, codes, pal_words):
    """Write a record (everything but the checksum) into zeroed ``words``; returns its checksum."""
    n = k * hw
    words[0] = (np.uint64(RECORD_FORMAT) | (np.uint64(b) << np.uint64(8)) | (np.uint64(width) << np.uint64(16))
                | (np.uint64(flags) << np.uint64(24)))
    words[1] = np.uint64(npal) | (np.uint64(n) << np.uint64(32))
    for j in range(k):
        words[2 + j] = (np.uint64(slot_base[j]) | (np.uint64(slot_top[j]) << np.uint64(16))
                        | (np.uint64(slot_step[j]) << np.uint64(32)) | (np.uint64(slot_bits[j]) << np.uint64(48)))
    po = 2 + k
    for i in range(npal):
        if width == 2:
            words[po + (i >> 2)] |= np.uint64(palette[i]) << np.uint64(16 * (i & 3))
        else:
            words[po + (i >> 1)] |= np.uint64(palette[i]) << np.uint64(32 * (i & 1))
    ids_start = po + pal_words
    end = _pack_bits(words[ids_start:], 0, inv, b)
    vals_start = ids_start + ((end + 63) >> 6)
    pos = 0
    for j in range(k):
        pos = _pack_bits(words[vals_start:], pos, codes[j * hw:(j + 1) * hw], slot_bits[j])
    c = _checksum(words, 0, words.shape[0])
    words[0] |= np.uint64(c) << np.uint64(32)
    return c


# --------------------------------------------------------------------------------------------
# Python side


def float16_keys(bits: np.ndarray) -> np.ndarray:
    """Order-preserving uint16 keys (as int64) of float16 bit patterns."""
    b = bits.astype(np.int64)
    return np.where(b & 0x8000, 0xFFFF - b, b | 0x8000)


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bits needed to store each non-negative integer (0 -> 0)."""
    return np.array([int(v).bit_length() for v in np.asarray(x).reshape(-1)], dtype=np.int64)


def encode_record(values: np.ndarray, indices: np.ndarray, *, lossy: bool = False) -> tuple[np.ndarray, int]:
    """Encode one map (``values`` float16 [k, H, W], finite; ``indices`` integer [k, H, W], >= 0, already
    validated) into a record. Returns ``(record uint8 array, checksum)``."""
    k, h, w = values.shape
    hw = h * w
    n = k * hw
    palette, inv = np.unique(indices.reshape(-1), return_inverse=True)
    npal = int(palette.shape[0])
    b = int(npal - 1).bit_length()
    width = 2 if int(palette[-1]) < 65536 else 4
    keys = float16_keys(np.ascontiguousarray(values).view(np.uint16).reshape(k, hw))
    base = keys.min(axis=1)
    top = keys.max(axis=1)
    if lossy:
        levels = 1 << LOSSY_CODE_BITS
        step = np.maximum(1, -(-(top - base + 1) // levels))
    else:
        step = np.ones(k, np.int64)
    codes = (keys - base[:, None]) // step[:, None]
    bits = _bit_length(codes.max(axis=1))
    pal_words = (npal * width + 7) >> 3
    id_words = (n * b + 63) >> 6
    val_words = (int(bits.sum()) * hw + 63) >> 6
    words = np.zeros(2 + k + pal_words + id_words + val_words, np.uint64)
    c = _fill_record(words, k, hw, npal, b, width, 1 if lossy else 0, base, top, step, bits,
                     palette.astype(np.int64), inv.reshape(-1).astype(np.uint64),
                     codes.reshape(-1).astype(np.uint64), pal_words)
    return words.view(np.uint8), int(c)


def allocate_maps(batch: int, num_classes: int, topk: int, map_size: tuple[int, int]) -> TopKMaps:
    """Uninitialized CPU output tensors for ``batch`` decoded maps."""
    h, w = map_size
    values = torch.empty((batch, topk, h, w), dtype=torch.float16)
    ids_dtype = torch.int16 if index_dtype_for(num_classes) == np.int16 else torch.int32
    indices = torch.empty((batch, topk, h, w), dtype=ids_dtype)
    return TopKMaps(values, indices)


def _check_out(out: TopKMaps, batch: int, num_classes: int, topk: int, map_size: tuple[int, int]):
    shape = (batch, topk, *map_size)
    want_ids = torch.int16 if num_classes <= 32767 else torch.int32
    if tuple(out.values.shape) != shape or tuple(out.indices.shape) != shape:
        raise ValueError(f"out tensors must be {shape}; got {tuple(out.values.shape)} / {tuple(out.indices.shape)}")
    if out.values.dtype != torch.float16 or out.indices.dtype != want_ids:
        raise ValueError(f"out tensors must be float16 / {want_ids}; got {out.values.dtype} / {out.indices.dtype}")
    if out.values.device.type != "cpu" or not out.values.is_contiguous() or not out.indices.is_contiguous():
        raise ValueError("out tensors must be contiguous CPU tensors (pinned memory is fine)")


def decode_into(buf64: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, expected: np.ndarray | None,
                num_classes: int, topk: int, map_size: tuple[int, int], out: TopKMaps | None,
                where: str) -> TopKMaps:
    """Decode records at byte ``offsets``/``lengths`` of ``buf64`` into ``out`` (allocated if None).

    ``where`` names the source for error messages; record positions in errors are reported as
    ``ids`` mapped by the caller when it raises."""
    batch = int(offsets.shape[0])
    if out is None:
        out = allocate_maps(batch, num_classes, topk, map_size)
    else:
        _check_out(out, batch, num_classes, topk, map_size)
    hw = map_size[0] * map_size[1]
    vals = out.values.numpy().view(np.uint16).reshape(batch, topk * hw)
    ids = out.indices.numpy().reshape(batch, topk * hw)
    check = expected is not None
    exp = expected if check else np.zeros(0, np.uint32)
    status, pos = _decode_batch(buf64, offsets, lengths, exp, check, num_classes, topk, hw, vals, ids)
    if status:
        raise RecordError(int(status), int(pos), where)
    return out


class RecordError(StoreError):
    """A record failed to decode; ``position`` is its position in the batch being decoded."""

    def __init__(self, status: int, position: int, where: str):
        self.status = status
        self.position = position
        self.where = where
        self.reason = _ERR_TEXT.get(status, f"decode error {status}")
        super().__init__(f"{where}: record at batch position {position}: {self.reason}")


def decode_records(records, num_classes: int, topk: int, map_size: Sequence[int], *,
                   lengths: np.ndarray | Sequence[int] | None = None, out: TopKMaps | None = None) -> TopKMaps:
    """Decode raw records (as stored, e.g. packed into an FFCV/DALI dataset) without a store.

    ``records`` is a list of uint8 arrays / bytes, or a 2-D uint8 array ``[B, L]`` of records padded
    to ``L`` bytes together with ``lengths`` ``[B]``. Every record's own checksum is verified."""
    map_size = (int(map_size[0]), int(map_size[1]))
    if isinstance(records, np.ndarray) and records.ndim == 2:
        if lengths is None:
            raise ValueError("decode_records: a padded 2-D records array needs `lengths`")
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        nrec, width = records.shape
        if lens.shape[0] != nrec:
            raise ValueError(f"decode_records: {nrec} records but {lens.shape[0]} lengths")
        if np.any(lens > width) or np.any(lens < 0):
            raise StoreError("decode_records: a record length exceeds the padded row width")
        if records.dtype != np.uint8:
            raise TypeError(f"decode_records: records must be uint8, got {records.dtype}")
        if width % 8 == 0 and records.flags.c_contiguous and \
                records.ctypes.data % 8 == 0:
            buf = records.reshape(-1).view(np.uint64)
        else:
            buf = np.ascontiguousarray(records)
            if width % 8:
                buf = np.pad(buf, ((0, 0), (0, 8 - width % 8)))
            width = buf.shape[1]
            buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint64)
        offsets = np.arange(nrec, dtype=np.int64) * width
        return decode_into(buf, offsets, lens, None, num_classes, topk, map_size, out, "decode_records")
    arrays = [np.frombuffer(r, dtype=np.uint8) if isinstance(r, (bytes, bytearray, memoryview))
              else np.asarray(r, dtype=np.uint8).reshape(-1) for r in records]
    lens = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays), np.int64)
    if len(arrays):
        offsets[1:] = np.cumsum(lens)[:-1]
    total = int(lens.sum())
    # One concatenation (records are multiples of 8 bytes, so offsets stay aligned; a record that is
    # not is reported as corrupt by the decoder), padded so the buffer can be viewed as uint64.
    buf = np.concatenate(arrays + [np.zeros((-total) % 8 + 8, np.uint8)]).view(np.uint64)
    return decode_into(buf, offsets, lens, None, num_classes, topk, map_size, out, "decode_records")


__all__ = ["TopKMaps", "StoreError", "RecordError", "encode_record", "decode_records", "float16_keys",
           "allocate_maps", "decode_into"]
