"""Packed, memory-mapped label store for per-image top-k score maps.

* :class:`StoreWriter` writes a store atomically, :class:`LabelStore` reads it (``read(ids)`` is one
  batched numba call over the mapped bytes), :func:`decode_records` decodes raw records handed over by
  a loader. The file format and the codec's error bound are documented in :mod:`tl_fast.store.format`.
* ``tl-fast convert-pt`` / ``tl-fast inspect`` live in :mod:`tl_fast.store.commands`.
"""
from .codec import RecordError, StoreError, TopKMaps, decode_records, encode_record
from .reader import LabelStore, open_store
from .writer import StoreWriter

__all__ = ["LabelStore", "StoreWriter", "TopKMaps", "StoreError", "RecordError", "decode_records",
           "encode_record", "open_store"]
