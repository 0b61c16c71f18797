"""A fix for FFCV's OS-cache memory manager: it must not mutate numba's shared (interned) types.

FFCV 1.0.2 marks its state read-only with ``t = numba.uint8[::1]; t.mutable = False``: ``t`` is the
process-wide ``Array(uint8, 1, 'C')`` object, so its hash changes while it is a key in numba's
dictionaries (the ``overloads`` of every dispatcher compiled with such an argument), which then
raise ``KeyError`` when iterated: intermittently while a pipeline thread type-infers its decoder,
always in those dispatchers' finalizers. :func:`fix_ffcv_state_types` replaces the manager's state
type and reader with ones that build the same read-only types without mutating shared ones. Only
the OS-cache manager is replaced (the backend always uses it). Its read also checks every packed
image's bytes against the hash recorded at pack time (:mod:`tl_fast.loaders.packed_hash`).
"""
from __future__ import annotations

import numba
from ffcv.memory_managers import OSCacheManager
from ffcv.memory_managers.os_cache import OSCacheContext
from ffcv.pipeline.compiler import Compiler

from ..packed_hash import EMPTY_FLAGS, EMPTY_HASHES, checked_read

_RO_BYTES = numba.types.Array(numba.types.uint8, 1, "C", readonly=True)
_U64_ARRAY = numba.types.Array(numba.types.uint64, 1, "C")
_U8_ARRAY = numba.types.Array(numba.types.uint8, 1, "C")


def _os_cache_state_type(self) -> numba.types.Tuple:
    """(file bytes (read-only memmap), sample pointers, sample sizes): the types FFCV's OS-cache
    manager ends up with, built without mutating numba's shared ones; then the recorded content
    hash and the changed flag of every allocation (:mod:`tl_fast.loaders.packed_hash`)."""
    return numba.types.Tuple([_RO_BYTES, _U64_ARRAY, _U64_ARRAY, _U64_ARRAY, _U8_ARRAY])


def _os_cache_reader(self):
    """The compiled ``(address, state) -> bytes`` read of the OS-cache manager (a read-only view of
    the memory-mapped file: the sample at ``address``, its size looked up in the pointer table),
    which also checks the bytes against their recorded hash (:func:`~tl_fast.loaders.packed_hash.checked_read`)."""
    def read(address, mem_state):
        data, ptrs, sizes, expected, changed = mem_state
        return checked_read(data, ptrs, sizes, expected, changed, address)

    return Compiler.compile(read, _RO_BYTES(numba.types.uint64, self.state_type))


def fix_ffcv_state_types() -> None:
    """Install the OS-cache manager's non-mutating state type and reader. Idempotent."""
    OSCacheManager.state_type = property(_os_cache_state_type)
    OSCacheManager.compile_reader = _os_cache_reader
    OSCacheContext.state = property(lambda self: (
        self.mmap, self.manager.ptrs, self.manager.sizes, getattr(self.manager, "expected_hashes", EMPTY_HASHES),
        getattr(self.manager, "changed", EMPTY_FLAGS)))
