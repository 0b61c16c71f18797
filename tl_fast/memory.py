"""Output buffers that do not page-fault afresh on every batch."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

# glibc's largest dynamic mmap threshold on 64-bit Linux: smaller buffers, once freed, are reused from
# the heap without page faults (huge pages gained nothing there); larger ones are fresh mmap pages
# every time.
_HUGE_PAGE_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized output tensor; on Linux CPUs, above glibc's mmap ceiling, backed by transparent
    huge pages if allowed.

    A fresh large CPU tensor page-faults once per 4 KB page on first write, which can cost more than
    computing what goes into it; ``madvise(MADV_HUGEPAGE)`` (what PyTorch's ``THP_MEM_ALLOC_ENABLE``
    does for all allocations) cuts the faults by the huge-page factor. A no-op where THP is off or
    the call fails."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    madvise = _libc_madvise() if out.device.type == "cpu" and nbytes >= _HUGE_PAGE_MIN_BYTES else None
    if madvise is not None:
        page = 4096
        start = (out.data_ptr() + page - 1) & ~(page - 1)
        end = (out.data_ptr() + nbytes) & ~(page - 1)
        madvise(start, end - start, _MADV_HUGEPAGE)
    return out
