"""tl_fast's own OS-cache memory manager for FFCV: used by tl_fast's loaders only, FFCV untouched.

FFCV's loader builds an :class:`ffcv.memory_managers.OSCacheManager` and compiles its memory read
from it. tl_fast's loader (:class:`.guard._GuardedLoader`) takes that manager as it is assigned and
replaces it, for itself alone, by :class:`CheckedOSCacheManager`, a subclass, before the read is
compiled. Nothing of FFCV's is changed, so a plain ``ffcv.loader.Loader`` built before, beside or
after a tl_fast loader keeps FFCV's own manager, reader and state.

The subclass differs from FFCV's manager in two ways:

* its state type is built without mutating numba's shared types. FFCV 1.0.2 marks its state
  read-only with ``t = numba.uint8[::1]; t.mutable = False``, and ``t`` is the process-wide
  ``Array(uint8, 1, 'C')`` object, whose hash then changes while it is a key in numba's dispatcher
  tables (``KeyError`` while a pipeline thread type-infers its decoder, and in dispatcher
  finalizers). FFCV does that for its own loaders still; tl_fast's never run that code;
* its read checks every packed image's bytes against the hash recorded at pack time and flags a
  changed allocation (:func:`tl_fast.loaders.packed_hash.checked_read`).
"""
from __future__ import annotations

import numba
import numpy as np
from ffcv.memory_managers import OSCacheManager
from ffcv.memory_managers.os_cache import OSCacheContext
from ffcv.pipeline.compiler import Compiler

from ..packed_hash import EMPTY_FLAGS, EMPTY_HASHES, checked_read

_RO_BYTES = numba.types.Array(numba.types.uint8, 1, "C", readonly=True)
_U64_ARRAY = numba.types.Array(numba.types.uint64, 1, "C")
_U8_ARRAY = numba.types.Array(numba.types.uint8, 1, "C")


class CheckedOSCacheContext(OSCacheContext):
    """FFCV's OS-cache context with the hash table and change flags in its state."""

    @property
    def state(self):
        m = self.manager
        return self.mmap, m.ptrs, m.sizes, m.expected_hashes, m.changed


class CheckedOSCacheManager(OSCacheManager):
    """FFCV's OS-cache manager with a non-mutating state type and a hash-checking read.

    ``expected_hashes`` (uint64, one per allocation; 0: not recorded) and ``changed`` (uint8 flags
    the read sets) start empty: the backend fills them for a version 4 ``.beton``."""

    def __init__(self, reader) -> None:
        super().__init__(reader)
        self._checked_state()

    def _checked_state(self) -> None:
        self.context = CheckedOSCacheContext(self)
        self.expected_hashes: np.ndarray = EMPTY_HASHES
        self.changed: np.ndarray = EMPTY_FLAGS

    @classmethod
    def adopt(cls, manager: OSCacheManager) -> "CheckedOSCacheManager":
        """This class over what FFCV's ``manager`` already computed from the file's allocation table
        (no second pass over it); ``manager`` itself is left as it was."""
        own = cls.__new__(cls)
        own.__dict__.update(manager.__dict__)
        own._checked_state()
        return own

    @property
    def state_type(self) -> numba.types.Tuple:
        """(file bytes, read-only; allocation pointers; allocation sizes; recorded hashes; change flags)."""
        return numba.types.Tuple([_RO_BYTES, _U64_ARRAY, _U64_ARRAY, _U64_ARRAY, _U8_ARRAY])

    def compile_reader(self):
        """The compiled ``(address, state) -> bytes`` read: a read-only view of the allocation at
        ``address`` in the mapped file, its bytes checked against the recorded hash."""
        def read(address, mem_state):
            data, ptrs, sizes, expected, changed = mem_state
            return checked_read(data, ptrs, sizes, expected, changed, address)

        return Compiler.compile(read, _RO_BYTES(numba.types.uint64, self.state_type))
