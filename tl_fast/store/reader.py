"""Memory-mapped reader of label stores (format: :mod:`tl_fast.store.format`).

How the record section is mapped is the ``access`` of :meth:`LabelStore.open`: ``"normal"`` (the
kernel's default, for tools that read a store once in order), ``"random"`` (``MADV_RANDOM``: a page
fault reads only its page, not the kernel's read-ahead window around it, which for scattered
records is mostly other samples' records), ``"populate"`` (every page read in and mapped at open,
so gathers never fault) and ``"auto"`` (the loaders'): ``"populate"`` when the records fit in half
the memory available, else ``"random"`` (a store the page cache cannot hold would have read-ahead
evicted before it is used). BENCHMARKS.md (issue 19, scale) has the measurements behind this.
"""
from __future__ import annotations

import json
import mmap
import os
import zlib
from typing import Iterable

import numpy as np
import torch

from .codec import RecordError, StoreError, TopKMaps, _gather_bytes, decode_into
from .format import (CRC_OFFSET, FLAG_LOSSY, HEADER_SIZE, MAGIC, READABLE_VERSIONS, UNKNOWN_FINGERPRINT_SIZE, align8,
                     fingerprint_columns, seal_fingerprints, unpack_header)


ACCESS_MODES = ("normal", "random", "populate", "auto")
_MADV_POPULATE_READ = 22  # Linux >= 5.14; Python's mmap module has no name for it


def available_memory() -> int:
    """Bytes of memory available without swapping (``MemAvailable``, or physical memory where that
    is unknown), at most what this process's cgroup (v2) may still use: a container's limit caps
    the page cache it gets, not the host's memory. 0 if nothing can be read."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not avail:
        try:
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - platform without sysconf
            avail = 0
    limit = _cgroup_headroom()
    return min(avail, limit) if limit is not None else avail


def _cgroup_headroom(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's memory cgroup may still use (v2 ``memory.max - memory.current``, v1
    ``memory.limit_in_bytes - memory.usage_in_bytes``), or None without a limit."""
    try:
        with open(proc) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for parts in lines:
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":
            names = ("memory.max", "memory.current")
            base = os.path.join(root, rel.lstrip("/"))
        elif "memory" in controllers.split(","):
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            base = os.path.join(root, "memory", rel.lstrip("/"))
        else:
            continue
        try:
            with open(os.path.join(base, names[0])) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
                continue
            with open(os.path.join(base, names[1])) as f:
                return max(0, int(limit) - int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return None


def resolve_access(access: str, record_bytes: int) -> str:
    """The mapping ``access`` (see the module docstring) for a record section of ``record_bytes``:
    ``"auto"`` becomes ``"populate"`` when it fits in half of :func:`available_memory`, else ``"random"``."""
    if access not in ACCESS_MODES:
        raise ValueError(f"access must be one of {ACCESS_MODES}, got {access!r}")
    if access != "auto":
        return access
    return "populate" if 2 * record_bytes <= available_memory() else "random"


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"record ids must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


class LabelStore:
    """A read-only, memory-mapped label store.

    ``LabelStore.open(path)`` checks the header (magic, version, sizes) and a crc32 of header, index
    and manifest; every :meth:`read` verifies each record's checksum while decoding. Any mismatch
    raises :class:`StoreError` naming the file (and the record). ``access`` says how the records are
    mapped (module docstring); the loaders open stores with ``"auto"``."""

    access: str = "normal"  # as asked (pickled with the path: a worker decides "auto" again)
    _advice: str = "normal"  # what was applied

    def __init__(self, path: str, mm: np.ndarray, header: dict, keys: list[str], metadata: dict,
                 offsets: np.ndarray, lengths: np.ndarray, checksums: np.ndarray):
        self.path = path
        self._mm = mm
        self._buf64 = mm.view(np.uint64)
        self.header = header
        self._keys = keys
        self._key_index: dict[str, int] | None = None
        self.metadata = metadata
        self._offsets = offsets
        self._lengths = lengths
        self._checksums = checksums

    # ----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, access: str = "normal") -> "LabelStore":
        """Open and validate the store at ``path``; map its records for ``access`` (:meth:`advise`)."""
        if access not in ACCESS_MODES:
            raise ValueError(f"access must be one of {ACCESS_MODES}, got {access!r}")
        path = os.fspath(path)
        size = os.path.getsize(path)
        if size < HEADER_SIZE:
            raise StoreError(f"{path}: {size} bytes is too small to be a tl_fast label store (truncated?)")
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        hdr = unpack_header(raw)
        if hdr["magic"] != MAGIC:
            raise StoreError(f"{path}: not a tl_fast label store (bad magic {hdr['magic']!r}); an interrupted "
                             "write leaves a zeroed header like this")
        if hdr["version"] not in READABLE_VERSIONS:
            raise StoreError(f"{path}: store format version {hdr['version']} is not supported (this tl_fast "
                             f"reads versions {', '.join(map(str, READABLE_VERSIONS))}): upgrade tl_fast")
        if hdr["version"] == 1:
            hdr["fingerprint_offset"] = 0  # bytes 112-119 were reserved
        if hdr["file_size"] != size:
            raise StoreError(f"{path}: file is {size} bytes but its header says {hdr['file_size']}: "
                             "the store is truncated or was modified")
        n = hdr["num_records"]
        ok = (size % 8 == 0 and hdr["data_offset"] == HEADER_SIZE
              and hdr["index_offset"] == hdr["data_offset"] + hdr["data_bytes"]
              and hdr["manifest_offset"] == hdr["index_offset"] + 16 * n
              and hdr["meta_offset"] == hdr["manifest_offset"] + hdr["manifest_bytes"]
              and hdr["meta_offset"] + hdr["meta_bytes"] <= size
              and (hdr["fingerprint_offset"] == 0
                   or (hdr["fingerprint_offset"] == align8(hdr["meta_offset"] + hdr["meta_bytes"])
                       and hdr["fingerprint_offset"] + 8 * fingerprint_columns(hdr["version"]) * n == size))
              and hdr["index_offset"] % 8 == 0
              and hdr["num_classes"] >= 1 and hdr["topk"] >= 1 and hdr["height"] >= 1 and hdr["width"] >= 1)
        if not ok:
            raise StoreError(f"{path}: inconsistent header (section offsets/sizes); the store is corrupted")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        zeroed = bytearray(raw)
        zeroed[CRC_OFFSET:CRC_OFFSET + 4] = bytes(4)
        crc = zlib.crc32(bytes(zeroed))
        crc = zlib.crc32(mm[hdr["index_offset"]:hdr["meta_offset"] + hdr["meta_bytes"]], crc)
        fo = hdr["fingerprint_offset"]
        fp_cols = fingerprint_columns(hdr["version"])
        if fo:
            crc = zlib.crc32(mm[fo:fo + 8 * fp_cols * n], crc)
        if crc != hdr["crc"]:
            raise StoreError(f"{path}: header/index/manifest checksum mismatch; the store is corrupted")
        io = hdr["index_offset"]
        offsets = np.frombuffer(mm, dtype="<u8", count=n, offset=io).astype(np.int64)
        lengths = np.frombuffer(mm, dtype="<u4", count=n, offset=io + 8 * n).astype(np.int64)
        checksums = np.frombuffer(mm, dtype="<u4", count=n, offset=io + 12 * n).astype(np.uint32)
        if n and (np.any(offsets < hdr["data_offset"]) or np.any(offsets % 8) or np.any(lengths % 8)
                  or np.any(offsets + lengths > hdr["index_offset"]) or np.any(lengths <= 0)):
            raise StoreError(f"{path}: index points outside the data section; the store is corrupted")
        try:
            manifest = bytes(mm[hdr["manifest_offset"]:hdr["meta_offset"]]).decode("utf-8")
            metadata = json.loads(bytes(mm[hdr["meta_offset"]:hdr["meta_offset"] + hdr["meta_bytes"]]) or b"{}")
        except (UnicodeDecodeError, ValueError) as err:
            raise StoreError(f"{path}: unreadable manifest or metadata ({err})") from err
        keys = manifest.split("\n") if n else []
        if len(keys) != n:
            raise StoreError(f"{path}: manifest has {len(keys)} keys for {n} records")
        fingerprints = seals = None
        if fo:
            fingerprints = (np.frombuffer(mm, dtype="<u8", count=n, offset=fo).astype(np.uint64),
                            np.frombuffer(mm, dtype="<u8", count=n, offset=fo + 8 * n).astype(np.uint64))
            if fp_cols == 3:
                seals = np.frombuffer(mm, dtype="<u8", count=n, offset=fo + 16 * n).astype(np.uint64)
        st = os.stat(path)
        store = cls(path, mm, hdr, keys, metadata, offsets, lengths, checksums)
        store.fingerprints = fingerprints
        store.seals = seals
        store._identity = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        if access != "normal":
            store.advise(access)
        return store

    def advise(self, access: str) -> str:
        """Map the record section for ``access`` (module docstring) and return what was applied
        (``"auto"`` resolved). Advice only: reads are correct whatever the kernel does with it, and
        a platform without ``madvise`` (or a kernel without ``MADV_POPULATE_READ``, then read-ahead
        of the whole section is asked for instead) keeps what it can."""
        applied = resolve_access(access, int(self.header["index_offset"]))
        self.access = access
        self._advice = applied
        self._madvise({"normal": "MADV_NORMAL", "random": "MADV_RANDOM", "populate": "MADV_NORMAL"}[applied])
        if applied == "populate" and not self._madvise(_MADV_POPULATE_READ):
            self._madvise("MADV_WILLNEED")
        return applied

    def _madvise(self, advice: str | int) -> bool:
        """``madvise(advice)`` over the record section (the index, manifest and fingerprints are read
        once at open); False where it is not available or the kernel refused it."""
        raw = getattr(self._mm, "_mmap", None)
        flag = getattr(mmap, advice, None) if isinstance(advice, str) else advice
        end = int(self.header["index_offset"]) // mmap.PAGESIZE * mmap.PAGESIZE
        if flag is None or raw is None or not hasattr(raw, "madvise") or end <= 0:
            return False
        try:
            raw.madvise(flag, 0, end)
        except (OSError, ValueError):
            return False
        return True

    def __reduce__(self):
        # Pickle by path (DataLoader workers reopen the map) instead of copying the mapped bytes.
        return (_reopen, (self.path, self.access))

    def __enter__(self) -> "LabelStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the memory map (reads afterwards fail)."""
        mm = getattr(self, "_mm", None)
        self._mm = None
        self._buf64 = None
        if mm is not None and getattr(mm, "_mmap", None) is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):
                pass  # views still alive elsewhere; the OS unmaps when they go

    def __repr__(self) -> str:
        return (f"LabelStore({self.path!r}, records={len(self)}, num_classes={self.num_classes}, "
                f"topk={self.topk}, map_size={self.map_size}, lossy={self.lossy})")

    # ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.header["num_records"])

    @property
    def num_classes(self) -> int:
        return int(self.header["num_classes"])

    @property
    def topk(self) -> int:
        return int(self.header["topk"])

    @property
    def map_size(self) -> tuple[int, int]:
        return int(self.header["height"]), int(self.header["width"])

    @property
    def lossy(self) -> bool:
        return bool(self.header["flags"] & FLAG_LOSSY)

    @property
    def keys(self) -> list[str]:
        """Record id -> key (image path relative to the image root, without extension)."""
        return self._keys

    @property
    def nbytes(self) -> int:
        """Size of the store file in bytes."""
        return int(self.header["file_size"])

    _identity: tuple | None = None
    fingerprints: tuple[np.ndarray, np.ndarray] | None = None
    """Per record the content fingerprint of its image, ``(sizes, hashes)`` (uint64 ``[N]`` each; a
    size of ``2**64 - 1`` means unknown), or None for a store that records none (e.g. version 1)."""

    seals: np.ndarray | None = None
    """Version 3: per record the seal binding its fingerprint to its record checksum
    (:func:`tl_fast.store.format.seal_fingerprints`), uint64 ``[N]``; None before version 3."""

    def unsealed(self) -> np.ndarray:
        """bool ``[N]``: records carrying a fingerprint that is not sealed to them, i.e. records (or
        their index rows) that moved against their fingerprints. All False before version 3."""
        if self.fingerprints is None or self.seals is None:
            return np.zeros(len(self), bool)
        sizes, hashes = self.fingerprints
        return self.has_fingerprint() & (seal_fingerprints(sizes, hashes, self._checksums) != self.seals)

    def check_seals(self) -> None:
        """Raise :class:`StoreError` naming the first records whose fingerprint is not sealed to them."""
        bad = np.flatnonzero(self.unsealed())
        if bad.size:
            names = ", ".join(repr(self._keys[i]) for i in bad[:3])
            names += f" (and {bad.size - 3} more)" if bad.size > 3 else ""
            raise StoreError(f"{self.path}: {bad.size} record(s) moved against their image fingerprints: {names} "
                             "(records or index rows reordered against their keys); rewrite the store from its source")

    def has_fingerprint(self) -> np.ndarray:
        """bool ``[N]``: which records carry their image's fingerprint."""
        if self.fingerprints is None:
            return np.zeros(len(self), bool)
        return self.fingerprints[0] != np.uint64(UNKNOWN_FINGERPRINT_SIZE)

    def check_unchanged(self) -> None:
        """Raise :class:`StoreError` if the file was modified, truncated or replaced since it was
        opened: a mapped file that shrinks kills a reader with SIGBUS instead of an error, so the
        loaders call this at each epoch start (and before each batch read)."""
        if getattr(self, "_identity", None) is None:
            return
        try:
            st = os.stat(self.path)
            now = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        except OSError as err:
            raise StoreError(f"{self.path}: the label store is gone since it was opened ({err.strerror}); "
                             "it was deleted or moved under a running loader") from None
        if now != self._identity:
            what = (f"its size went from {self._identity[0]} to {now[0]} bytes" if now[0] != self._identity[0]
                    else "it was replaced" if now[2:] != self._identity[2:] else "it was rewritten in place")
            raise StoreError(f"{self.path}: the label store file changed since it was opened ({what}): a store must "
                             "not be rewritten under a running loader; restart the loader on the new file")

    @property
    def record_lengths(self) -> np.ndarray:
        """Encoded length in bytes of every record (int64 [N])."""
        return self._lengths

    def _index(self) -> dict[str, int]:
        if self._key_index is None:
            index = {key: i for i, key in enumerate(self._keys)}
            if len(index) != len(self._keys):
                raise StoreError(f"{self.path}: manifest holds duplicate keys")
            self._key_index = index
        return self._key_index

    def index_of(self, key: str) -> int:
        """Record id of ``key``; ``KeyError`` naming the key (and the store) if it is absent."""
        try:
            return self._index()[key]
        except KeyError:
            raise KeyError(f"no label record for {key!r} in {self.path}") from None

    def lookup(self, keys: Iterable[str]) -> np.ndarray:
        """Record ids (int64) of ``keys``; ``KeyError`` naming the first missing one."""
        index = self._index()
        try:
            return np.fromiter((index[k] for k in keys), dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"no label record for {err.args[0]!r} in {self.path}") from None

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"record id {bad} out of range for {self.path} ({len(self)} records)")

    def record_bytes(self, i: int) -> np.ndarray:
        """The encoded record ``i`` as a uint8 array (a copy), e.g. to pack into an FFCV/DALI dataset."""
        ids = _as_ids(i)
        self._check_ids(ids)
        o, ln = int(self._offsets[ids[0]]), int(self._lengths[ids[0]])
        return np.array(self._mm[o:o + ln], dtype=np.uint8)

    def raw_records(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Encoded records ``ids`` as a zero-padded uint8 array ``[B, L]`` (``L`` a multiple of 8) and
        their lengths ``[B]`` (int64): one batched copy, ready for :func:`decode_records` or for
        handing to a loader pipeline."""
        ids = _as_ids(ids)
        self._check_ids(ids)
        lengths = self._lengths[ids]
        width = int(lengths.max()) if ids.size else 8
        out = np.zeros((ids.size, (width + 7) // 8 * 8), np.uint8)
        _gather_bytes(self._mm, self._offsets[ids], lengths, out)
        return out, lengths

    def read(self, ids, out: TopKMaps | None = None) -> TopKMaps:
        """Decode records ``ids`` (sequence / array / tensor of ints) into CPU tensors, one batched call.

        ``out`` may be a preallocated (e.g. pinned) :class:`TopKMaps` of the right shape and dtypes."""
        if self._buf64 is None:
            raise StoreError(f"{self.path}: store is closed")
        ids = _as_ids(ids)
        self._check_ids(ids)
        try:
            return decode_into(self._buf64, self._offsets[ids], self._lengths[ids], self._checksums[ids],
                               self.num_classes, self.topk, self.map_size, out, self.path)
        except RecordError as err:
            rid = int(ids[err.position])
            raise StoreError(f"{self.path}: record {rid} ({self._keys[rid]!r}): {err.reason}") from None

    def verify(self, *, batch_size: int = 4096, progress: bool = False) -> None:
        """Decode every record, checking its checksum and bounds; raises :class:`StoreError` on the
        first bad one. (:meth:`check_seals` checks the fingerprints' seals.)"""
        from tqdm.auto import tqdm

        n = len(self)
        bar = tqdm(total=n, unit="rec", desc=f"verify {os.path.basename(self.path)}", disable=not progress)
        self._madvise("MADV_SEQUENTIAL")  # one pass in file order: read ahead, whatever the access
        try:
            with bar:
                for start in range(0, n, batch_size):
                    stop = min(n, start + batch_size)
                    self.read(np.arange(start, stop))
                    bar.update(stop - start)
        finally:
            if self._mm is not None:
                self._madvise("MADV_RANDOM" if self._advice == "random" else "MADV_NORMAL")


def _reopen(path: str, access: str = "normal") -> LabelStore:
    return LabelStore.open(path, access=access)


def open_store(path: str | os.PathLike, *, access: str = "normal") -> LabelStore:
    """Alias of :meth:`LabelStore.open`."""
    return LabelStore.open(path, access=access)


__all__ = ["ACCESS_MODES", "LabelStore", "available_memory", "open_store", "resolve_access"]
