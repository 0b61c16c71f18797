"""Counter-based random numbers keyed by ``(seed, epoch, key, stream)``.

Every random draw in tl_fast is a pure function of its key: no generator state is carried between
samples, workers or processes, so any backend can recompute a sample's augmentation from its index
and a run resumes to the step. The mixer is SplitMix64's finalizer applied to a combined key; it is
written with plain uint64 arithmetic so numpy vectorizes it and numba compiles it unchanged.
"""
from __future__ import annotations

import enum

import numpy as np


class Stream(enum.IntEnum):
    """Every random stream of tl_fast, in one place: one id per kind of draw, so adding a draw never
    shifts another. A new kind of draw takes a new number; a number is never reused."""

    CROP = 1  # random resized crop attempts (plan)
    FLIP = 2  # horizontal flip (plan)
    RA_OP = 3  # RandAugment operation per layer (plan)
    RA_APPLY = 4  # RandAugment apply test per layer (plan)
    RA_MAG = 5  # RandAugment magnitude noise (plan)
    RA_SIGN = 6  # RandAugment sign (plan)
    MIX_BOX = 7  # MixToken box (plan)
    SHUFFLE = 100  # the epoch's sample order (loader)
    ERASE = 101  # random-erasing box (augment)
    ERASE_NOISE = 102  # random-erasing noise seed (augment)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a bijection on uint64 with good avalanche."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_keys(seed: int, epoch: int, keys: np.ndarray, stream: int) -> np.ndarray:
    """uint64 hashes of ``(seed, epoch, key, stream)`` for every key in ``keys``."""
    keys = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN)
        h = _mix64(h ^ (np.uint64(epoch & 0xFFFFFFFFFFFFFFFF) + _GOLDEN))
        h = _mix64(h ^ (np.uint64(stream & 0xFFFFFFFFFFFFFFFF) * _GOLDEN))
        return _mix64(h ^ (keys * _GOLDEN + np.uint64(1)))


def uniform(seed: int, epoch: int, keys: np.ndarray, stream: int, count: int) -> np.ndarray:
    """``[len(keys), count]`` float64 uniforms in ``[0, 1)``, one independent stream per key."""
    base = hash_keys(seed, epoch, keys, stream)
    with np.errstate(over="ignore"):
        draws = _mix64(base[:, None] + (np.arange(1, count + 1, dtype=np.uint64) * _GOLDEN)[None, :])
    return (draws >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def normal(seed: int, epoch: int, keys: np.ndarray, stream: int, count: int) -> np.ndarray:
    """``[len(keys), count]`` standard normal draws (Box-Muller on two uniform streams)."""
    u = uniform(seed, epoch, keys, stream, 2 * count)
    u1 = 1.0 - u[:, :count]  # in (0, 1], safe for log
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u[:, count:])
