"""Whole-byte integrity of the images in a ``.beton``: a 64-bit hash of every packed image's bytes,
recorded by ``tl-fast pack-ffcv`` and verified where the FFCV pipeline reads those bytes.

:func:`content_hash` reads every byte (eight-byte little-endian words into four independent
multiply-xorshift lanes, so it runs at memory speed rather than at one multiply's latency per word)
and is never 0, which marks "not recorded". :func:`checked_read` is the body of the backend's
memory read: it returns an allocation's bytes like FFCV's own read, and when a hash was recorded
for that allocation and the bytes no longer match it, it sets the allocation's flag. The loader
looks at the flags of every batch before it delivers the batch, and names the changed images. A
flag rather than an exception: numba's parallel loops (FFCV's decoders run in them) cannot raise.
"""
from __future__ import annotations

import numba
import numpy as np

_G = np.uint64(0x9E3779B97F4A7C15)
_M = np.uint64(0xFF51AFD7ED558CCD)
_C = np.uint64(0xC4CEB9FE1A85EC53)

EMPTY_HASHES = np.zeros(0, np.uint64)
EMPTY_FLAGS = np.zeros(0, np.uint8)


@numba.njit(cache=True, nogil=True, inline="always")
def _lane(h, w):
    h = (h ^ w) * _M
    return h ^ (h >> np.uint64(29))


@numba.njit(cache=True, nogil=True, inline="always")
def _word(data, i):
    """The little-endian 64-bit word at byte ``i`` of ``data`` (``i + 8 <= len``)."""
    return (np.uint64(data[i]) | (np.uint64(data[i + 1]) << np.uint64(8))
            | (np.uint64(data[i + 2]) << np.uint64(16)) | (np.uint64(data[i + 3]) << np.uint64(24))
            | (np.uint64(data[i + 4]) << np.uint64(32)) | (np.uint64(data[i + 5]) << np.uint64(40))
            | (np.uint64(data[i + 6]) << np.uint64(48)) | (np.uint64(data[i + 7]) << np.uint64(56)))


@numba.njit(cache=True, nogil=True)
def content_hash(data) -> np.uint64:
    """64-bit hash of all of ``data`` (uint8, 1-D); never 0."""
    n = data.shape[0]
    seed = np.uint64(n) * _G
    h0 = seed ^ np.uint64(1)
    h1 = seed ^ np.uint64(2)
    h2 = seed ^ np.uint64(3)
    h3 = seed ^ np.uint64(4)
    i = 0
    while i + 32 <= n:
        h0 = _lane(h0, _word(data, i))
        h1 = _lane(h1, _word(data, i + 8))
        h2 = _lane(h2, _word(data, i + 16))
        h3 = _lane(h3, _word(data, i + 24))
        i += 32
    tail = np.uint64(0)
    shift = np.uint64(0)
    while i < n:
        tail |= np.uint64(data[i]) << shift
        shift += np.uint64(8)
        if shift == np.uint64(64):
            h0 = _lane(h0, tail)
            tail = np.uint64(0)
            shift = np.uint64(0)
        i += 1
    h = _lane(h1 ^ (tail * _C), h0)
    h = _lane(h, h2)
    h = _lane(h, h3)
    h = (h ^ (h >> np.uint64(32))) * _C
    h ^= h >> np.uint64(31)
    return h if h != np.uint64(0) else np.uint64(1)


@numba.njit(cache=True, nogil=True)
def packed_content_hashes(buf, offsets, sizes) -> np.ndarray:
    """:func:`content_hash` of every byte range ``buf[offsets[i]:offsets[i] + sizes[i]]``."""
    out = np.empty(offsets.shape[0], np.uint64)
    for i in range(offsets.shape[0]):
        out[i] = content_hash(buf[offsets[i]:offsets[i] + sizes[i]])
    return out


@numba.njit(nogil=True)
def checked_read(data, ptrs, sizes, expected, changed, address):
    """The bytes of the allocation at ``address`` (``ptrs`` sorted, ``sizes`` alike); sets
    ``changed[i]`` when allocation ``i`` has a recorded hash (``expected[i] != 0``) its bytes
    no longer match. ``expected`` and ``changed`` may be empty (nothing recorded)."""
    i = np.searchsorted(ptrs, address)
    view = data[address:address + sizes[i]]
    if i < expected.shape[0] and expected[i] != np.uint64(0):
        if content_hash(view) != expected[i]:
            changed[i] = np.uint8(1)
    return view


def allocation_table(ptrs: np.ndarray, image_ptrs: np.ndarray,
                     image_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(expected, where)``: per allocation of the sorted pointer table ``ptrs``, the recorded hash
    (0 for allocations that are not images), and per sample the position of its image in ``ptrs``."""
    where = np.searchsorted(ptrs, image_ptrs)
    expected = np.zeros(len(ptrs), np.uint64)
    expected[where] = image_hashes
    return expected, where
