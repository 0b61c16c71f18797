"""Atomic writer of label stores (format: :mod:`tl_fast.store.format`)."""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Any, Sequence

import numpy as np
import torch

from .codec import StoreError, encode_record
from .format import (FLAG_LOSSY, HEADER_SIZE, UNKNOWN_FINGERPRINT_SIZE, VERSION, align8, pack_header,
                     seal_fingerprints)

_MAX_CLASSES = 2**31 - 1


def _as_numpy(x, what: str, key: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise StoreError(f"{key!r}: {what} is not array-like ({err})") from err


def check_key(key: str) -> str:
    """Validate a record key (relative image path without extension, '/'-separated)."""
    if not isinstance(key, str) or not key:
        raise StoreError(f"record key must be a non-empty str, got {key!r}")
    if "\n" in key or "\r" in key or "\0" in key:
        raise StoreError(f"record key {key!r} contains a newline or NUL character")
    if key.startswith("/"):
        raise StoreError(f"record key {key!r} must be relative to the image root (no leading '/')")
    return key


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False if another process holds one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no stale-temporary detection
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporaries an interrupted (killed) writer of ``path`` left beside it: files
    ``.<name>.*.tmp`` that no live writer holds locked. Returns the removed paths."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    for entry in entries:
        if not (entry.startswith(f".{name}.") and entry.endswith(".tmp")):
            continue
        candidate = os.path.join(directory, entry)
        try:
            fd = os.open(candidate, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            if _lock(fd):
                os.unlink(candidate)
                removed.append(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


class StoreWriter:
    """Write a label store atomically.

    ::

        with StoreWriter("train.tls", num_classes=1000, topk=5, map_size=(18, 18)) as w:
            w.add("n01440764/img_0001", values, indices)   # [k, H, W] each, numpy or torch

    Records are streamed into a temporary file beside ``path``; the header is written last and the
    file renamed onto ``path`` when the ``with`` block ends without an exception. An exception (or
    :meth:`abort`) removes the temporary file and leaves any previous ``path`` untouched.

    Args:
        path: destination file.
        num_classes: K; every class id must be in ``[0, K)``. ``None`` infers ``K = max id + 1``
            at close (used by ``convert-pt`` when ``--num-classes`` is not given).
        topk: k, maps are ``[k, H, W]``.
        map_size: ``(H, W)``; ``None`` takes it from the first record.
        lossy: quantize values to 8-bit codes (error bound in :mod:`tl_fast.store.format`).
        metadata: JSON-serializable dict stored in the file (``LabelStore.metadata``).
    """

    def __init__(self, path: str | os.PathLike, *, num_classes: int | None, topk: int,
                 map_size: Sequence[int] | None = None, lossy: bool = False,
                 metadata: dict[str, Any] | None = None):
        self.path = os.fspath(path)
        if num_classes is not None and not (1 <= int(num_classes) <= _MAX_CLASSES):
            raise ValueError(f"num_classes must be in [1, {_MAX_CLASSES}], got {num_classes}")
        if int(topk) < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.topk = int(topk)
        self.map_size = None if map_size is None else (int(map_size[0]), int(map_size[1]))
        if self.map_size is not None and min(self.map_size) < 1:
            raise ValueError(f"map_size must be positive, got {map_size}")
        self.lossy = bool(lossy)
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail early on non-serializable metadata
        self._keys: list[str] = []
        self._key_set: set[str] = set()
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._checksums: list[int] = []
        # record id -> its image's (size, hash); records without one are written as unknown
        self.fingerprints: dict[int, tuple[int, int]] = {}
        self._max_id = -1
        self._pos = HEADER_SIZE
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(self.path)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory)
        _lock(fd)  # held while writing: a temporary nobody holds is a dead writer's
        self._file = os.fdopen(fd, "wb")
        self._file.write(bytes(HEADER_SIZE))  # zero header until close: a partial file never opens
        self._closed = False

    # ----------------------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, values, indices, *, fingerprint: tuple[int, int] | None = None) -> int:
        """Append the map of image ``key``; returns its record id. Rejects (naming ``key``) duplicate
        keys, shape mismatches, non-finite values, values that overflow float16, non-integer ids and
        ids outside ``[0, K)``. Nothing is written for a rejected record.

        ``fingerprint``: the image's ``(size, hash)`` (:func:`tl_fast.imagecheck.file_fingerprint`),
        checked by the loaders when they join images and records."""
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")
        check_key(key)
        if key in self._key_set:
            raise StoreError(f"duplicate record key {key!r}")
        v = _as_numpy(values, "values", key)
        ids = _as_numpy(indices, "indices", key)
        if self.map_size is None and v.ndim == 3:
            self.map_size = (int(v.shape[1]), int(v.shape[2]))
        want = (self.topk, *(self.map_size or (-1, -1)))
        if v.shape != want or ids.shape != want:
            raise StoreError(f"{key!r}: values {v.shape} and indices {ids.shape} must both be [k, H, W] = {want}")
        if not np.issubdtype(v.dtype, np.floating):
            raise StoreError(f"{key!r}: values must be floating point, got {v.dtype}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise StoreError(f"{key!r}: indices must be integers, got {ids.dtype} "
                             "(convert float class ids explicitly, as convert-pt does)")
        if not np.all(np.isfinite(v)):
            bad = np.argwhere(~np.isfinite(v))[0]
            raise StoreError(f"{key!r}: non-finite value {v[tuple(bad)]} at [k, y, x] = {tuple(int(t) for t in bad)}")
        with np.errstate(over="ignore"):
            v16 = np.ascontiguousarray(v, dtype=np.float16)
        if v.dtype != np.float16 and not np.all(np.isfinite(v16)):
            bad = np.argwhere(~np.isfinite(v16))[0]
            raise StoreError(f"{key!r}: value {v[tuple(bad)]} at [k, y, x] = {tuple(int(t) for t in bad)} "
                             "overflows float16 (|x| > 65504)")
        lo, hi = int(ids.min()), int(ids.max())
        limit = self.num_classes if self.num_classes is not None else _MAX_CLASSES
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise StoreError(f"{key!r}: class id {bad} outside [0, {limit})")
        record, checksum = encode_record(v16, ids.astype(np.int64, copy=False), lossy=self.lossy)
        self._file.write(memoryview(record))
        self._offsets.append(self._pos)
        self._lengths.append(record.shape[0])
        self._checksums.append(checksum)
        if fingerprint is not None:
            self.fingerprints[len(self._keys)] = (int(fingerprint[0]), int(fingerprint[1]))
        self._pos += record.shape[0]
        self._keys.append(key)
        self._key_set.add(key)
        self._max_id = max(self._max_id, hi)
        return len(self._keys) - 1

    def add_encoded(self, key: str, record: np.ndarray, checksum: int, *,
                    fingerprint: tuple[int, int] | None = None) -> int:
        """Append an already encoded record (e.g. copied from another store whose reader verified it,
        with that store's index checksum); returns its record id. Needs an explicit ``num_classes``."""
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")
        if self.num_classes is None or self.map_size is None:
            raise StoreError(f"{self.path}: add_encoded needs num_classes and map_size given to the writer")
        check_key(key)
        if key in self._key_set:
            raise StoreError(f"duplicate record key {key!r}")
        record = np.ascontiguousarray(record, dtype=np.uint8).reshape(-1)
        if record.shape[0] == 0 or record.shape[0] % 8:
            raise StoreError(f"{key!r}: an encoded record is a positive multiple of 8 bytes, got {record.shape[0]}")
        self._file.write(memoryview(record))
        self._offsets.append(self._pos)
        self._lengths.append(record.shape[0])
        self._checksums.append(int(checksum))
        if fingerprint is not None:
            self.fingerprints[len(self._keys)] = (int(fingerprint[0]), int(fingerprint[1]))
        self._pos += record.shape[0]
        self._keys.append(key)
        self._key_set.add(key)
        return len(self._keys) - 1

    def add_batch(self, keys: Sequence[str], values, indices) -> None:
        """:meth:`add` for ``[B, k, H, W]`` values and indices (e.g. one annotator batch)."""
        v = _as_numpy(values, "values", "batch")
        ids = _as_numpy(indices, "indices", "batch")
        if len(keys) != v.shape[0] or len(keys) != ids.shape[0]:
            raise StoreError(f"add_batch: {len(keys)} keys for values {v.shape} and indices {ids.shape}")
        for i, key in enumerate(keys):
            self.add(key, v[i], ids[i])

    def copy_from(self, store) -> None:
        """Append every record of the open :class:`~tl_fast.store.LabelStore` ``store`` as encoded
        (no decode and re-encode: how ``tl-fast annotate`` joins the blocks its ranks wrote). The
        stores must agree on K, k, H, W and mode; every record is first verified (checksum, bounds). The
        images' fingerprints, where ``store`` records them, are kept."""
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")
        want = (self.num_classes, self.topk, self.map_size, self.lossy)
        got = (store.num_classes, store.topk, store.map_size, store.lossy)
        if want != got:
            raise StoreError(f"{store.path}: (K, k, (H, W), lossy) = {got} differs from {self.path}'s {want}")
        store.verify()
        for key in store.keys:
            check_key(key)
            if key in self._key_set:
                raise StoreError(f"duplicate record key {key!r} (from {store.path})")
        base = len(self._keys)
        store.check_seals()  # a store whose records moved against their fingerprints is not copied on
        if store.fingerprints is not None:  # the images' fingerprints travel with their records
            known = np.flatnonzero(store.has_fingerprint())
            sizes, hashes = store.fingerprints
            for j in known.tolist():
                self.fingerprints[base + j] = (int(sizes[j]), int(hashes[j]))
        start, size = int(store.header["data_offset"]), int(store.header["data_bytes"])
        self._file.write(memoryview(store._mm[start:start + size]))
        self._offsets.extend((store._offsets - start + self._pos).tolist())
        self._lengths.extend(store.record_lengths.tolist())
        self._checksums.extend(store._checksums.tolist())
        self._pos += size
        self._keys.extend(store.keys)
        self._key_set.update(store.keys)
        self._max_id = max(self._max_id, store.num_classes - 1)

    # ----------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Discard everything written; ``path`` is left as it was."""
        if self._closed:
            return
        self._closed = True
        try:
            self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def close(self) -> None:
        """Write index, manifest, metadata and header, then atomically rename onto ``path``."""
        if self._closed:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _finish(self) -> None:
        n = len(self._keys)
        if self.map_size is None:
            raise StoreError(f"{self.path}: no records and no map_size given; cannot write an empty store "
                             "without knowing its map size")
        num_classes = self.num_classes if self.num_classes is not None else max(self._max_id + 1, 1)
        data_bytes = self._pos - HEADER_SIZE
        index = (np.asarray(self._offsets, dtype="<u8").tobytes() + np.asarray(self._lengths, dtype="<u4").tobytes()
                 + np.asarray(self._checksums, dtype="<u4").tobytes())
        manifest = "\n".join(self._keys).encode("utf-8")
        meta = dict(self.metadata)
        meta.setdefault("writer", "tl_fast.store")
        meta["lossy"] = self.lossy
        meta_raw = json.dumps(meta, sort_keys=True).encode("utf-8")
        index_offset = self._pos
        manifest_offset = index_offset + len(index)
        meta_offset = manifest_offset + len(manifest)
        fp_offset = align8(meta_offset + len(meta_raw)) if self.fingerprints else 0
        fp_raw = b""
        if self.fingerprints:  # sizes, hashes, seals (format.seal_fingerprints; 0 where unknown)
            fp = np.zeros((3, n), dtype="<u8")
            fp[0] = UNKNOWN_FINGERPRINT_SIZE
            rid = np.fromiter(self.fingerprints, dtype=np.int64, count=len(self.fingerprints))
            fp[:2, rid] = np.array(list(self.fingerprints.values()), dtype=np.uint64).reshape(-1, 2).T
            fp[2, rid] = seal_fingerprints(fp[0, rid], fp[1, rid], np.asarray(self._checksums, np.uint32)[rid])
            fp_raw = fp.tobytes()
        file_size = align8(meta_offset + len(meta_raw)) + len(fp_raw)
        fields = dict(version=VERSION, flags=FLAG_LOSSY if self.lossy else 0, num_classes=num_classes,
                      topk=self.topk, height=self.map_size[0], width=self.map_size[1], num_records=n,
                      data_offset=HEADER_SIZE, data_bytes=data_bytes, index_offset=index_offset,
                      manifest_offset=manifest_offset, manifest_bytes=len(manifest), meta_offset=meta_offset,
                      meta_bytes=len(meta_raw), file_size=file_size, crc=0, reserved=0,
                      fingerprint_offset=fp_offset)
        crc = zlib.crc32(pack_header(**fields))
        for part in (index, manifest, meta_raw, fp_raw):
            crc = zlib.crc32(part, crc)
        fields["crc"] = crc
        f = self._file
        f.write(index)
        f.write(manifest)
        f.write(meta_raw)
        f.write(bytes(file_size - len(fp_raw) - (meta_offset + len(meta_raw))))
        f.write(fp_raw)
        f.seek(0)
        f.write(pack_header(**fields))
        f.flush()
        os.fsync(f.fileno())
        os.replace(self._tmp, self.path)  # still locked: no cleanup can take it for a dead writer's
        f.close()
        try:  # make the rename durable
            dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
