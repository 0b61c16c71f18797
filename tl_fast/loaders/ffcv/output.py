"""Batches decoded straight into tensors the backend owns, by FFCV's pipeline threads.

FFCV decodes into a small ring of buffers it reuses: a batch it hands out is overwritten a few
batches later, so a loader that gives its batches away must copy them out first, in the thread
that receives them, while the decoder threads wait for the core. Instead, before each batch the
backend allocates the batch's own tensor and writes every sample's row address into a plan column
(:data:`~tl_fast.loaders.ffcv.field.PLAN_COLUMNS`); the decoder, in FFCV's parallel loop, then
writes each crop there as CHW, flipped by the plan, and normalized when the batch leaves the CPU
normalized (:func:`write_chw`). FFCV's own buffer is only the decoder's scratch.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba.core import cgutils, types
from numba.extending import intrinsic

from ...memory import new_output


@intrinsic
def _address_as_pointer(typingctx, address):
    """A ``void *`` from an integer address (for ``numba.carray``)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@numba.njit(nogil=True, inline="always")
def write_chw(crop, flip, table, normalize, address):  # pragma: no cover - compiled
    """Write the uint8 HWC ``crop`` at ``address`` as CHW (mirrored when ``flip``): float32 levels
    ``table[c, value]`` when ``normalize``, else the uint8 values."""
    h, w = crop.shape[0], crop.shape[1]
    if normalize:
        out = numba.carray(_address_as_pointer(address), (3, h, w), np.float32)
        for c in range(3):
            levels = table[c]
            for y in range(h):
                if flip:
                    for x in range(w):
                        out[c, y, x] = levels[crop[y, w - 1 - x, c]]
                else:
                    for x in range(w):
                        out[c, y, x] = levels[crop[y, x, c]]
    else:
        raw = numba.carray(_address_as_pointer(address), (3, h, w), np.uint8)
        for c in range(3):
            for y in range(h):
                if flip:
                    for x in range(w):
                        raw[c, y, x] = crop[y, w - 1 - x, c]
                else:
                    for x in range(w):
                        raw[c, y, x] = crop[y, x, c]


def normalize_table() -> np.ndarray:
    """float32 ``[3, 256]``: each level normalized exactly as :func:`tl_fast.augment.normalize` does."""
    from ...augment import normalize

    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256).expand(1, 3, 1, 256).clone()
    return np.ascontiguousarray(normalize(levels).view(3, 256).numpy())


def batch_output(n: int, size: int, normalized: bool, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A batch's own ``[n, 3, size, size]`` tensor (float32 if ``normalized``, else uint8; pinned if
    ``pin``) and the address of each sample's row in it, for the decoder."""
    dtype = torch.float32 if normalized else torch.uint8
    if pin:
        images = torch.empty((n, 3, size, size), dtype=dtype, pin_memory=True)
    else:
        images = new_output((n, 3, size, size), dtype, torch.device("cpu"))
    row = 3 * size * size * images.element_size()
    return images, np.uint64(images.data_ptr()) + np.arange(n, dtype=np.uint64) * np.uint64(row)
