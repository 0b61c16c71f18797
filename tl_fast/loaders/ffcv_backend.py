"""FFCV backend: a ``.beton`` written by ``tl-fast pack-ffcv`` (images + class ids + sample ids +
label records, or no records with ``--no-labels``), read with a decoder whose crop comes from the
geometry plan.

* ``PlanImageField`` is FFCV's RGB image field with two more metadata columns, the original image
  size: the plan is a function of the original size, while the stored image may be downscaled.
* ``PlanCropDecoder`` subclasses FFCV's resized-crop decoder and overrides ``generate_code``: for
  every sample it computes the plan's crop (and flip) from ``(seed, epoch, sample index, original
  size)`` inside the compiled code — a numba port of :func:`tl_fast.plan.random_resized_crop` and of
  the counter RNG (tests check it equals the numpy plan) — maps the box proportionally into the
  stored image, decodes, crops, resizes and flips.
* One FFCV loader (compiled once) serves every epoch: the epoch reaches the compiled code at run
  time through an ``epoch`` column of the image metadata (set before each epoch), and each epoch's
  order is this rank's shard, in order, with sequential traversal. The loader does its own sharding
  (the same for every backend) instead of FFCV's ``distributed=True``, which would pad the shard
  with repeated samples.
* A failing pipeline thread would leave FFCV's iterator waiting forever; ``_GuardedEpochIterator``
  forwards the exception to the main process, and a watchdog raises ``TimeoutError`` when no batch
  arrives within ``timeout_s``.
* Label records are packed as a bytes field (uint8; numba has no float16) and decoded in the main
  process with :func:`tl_fast.store.decode_records`. A file packed without labels has no such field
  (``has_records`` false in its JSON); it serves loaders without token labels only.
* Thread safety. FFCV 1.0.2's OS-cache memory manager marks its state read-only by setting
  ``mutable = False`` on numba's *interned* array types (``numba.uint8[::1]`` is one object shared
  by the whole process). That changes the hash of a type that is already a key in numba's tables
  (every dispatcher's ``overloads``), so later look-ups raise ``KeyError`` (in a pipeline thread
  compiling its decoder, and in dispatcher finalizers); :func:`_fix_ffcv_state_types` replaces its
  state type and reader with ones that build the same read-only types without mutating shared ones. And the
  pipeline thread compiles its code on the first batch: ``__iter__`` waits for that batch, so numba
  compilation (which parses source with ``ast``) never overlaps work in the calling thread — on
  CPython 3.11 two threads using ``ast`` at once can fail with ``SystemError: AST constructor
  recursion depth mismatch``.
"""
from __future__ import annotations

import base64
import json
import math
import os
import threading
import time
from dataclasses import dataclass, replace
from queue import Empty
from typing import Iterator, Sequence

import numba
import numpy as np
import torch

from ..imagecheck import packed_fingerprints
from ..memory import new_output
from ..optional import require
from ..plan import _S_CROP, _S_FLIP
from .batch import LoaderConfig
from .common import PlanMaker

META_SUFFIX = ".json"
FORMAT = "tl_fast-ffcv"
FORMAT_VERSION = 3
# Version 2 files (no image fingerprints, no paths) still load, without the per-batch byte check.
READABLE_FORMAT_VERSIONS = (2, 3)
# Field order in the file (the combined metadata names them f0, f1, ... in this order); a file packed
# without labels has the first three only.
FIELDS = ("image", "label", "index", "record")


require("ffcv", "backend='ffcv'")
from ffcv.fields import BytesField, IntField, RGBImageField  # noqa: E402
from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.bytes import BytesDecoder  # noqa: E402
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder  # noqa: E402
from ffcv.libffcv import imdecode, resize_crop  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.loader.epoch_iterator import EpochIterator  # noqa: E402
from ffcv.memory_managers import OSCacheManager  # noqa: E402
from ffcv.pipeline.compiler import Compiler  # noqa: E402

_RO_BYTES = numba.types.Array(numba.types.uint8, 1, "C", readonly=True)
_U64_ARRAY = numba.types.Array(numba.types.uint64, 1, "C")


def _os_cache_state_type(self) -> numba.types.Tuple:
    """(file bytes (read-only memmap), sample pointers, sample sizes): the types FFCV's OS-cache
    manager ends up with, built without mutating numba's shared ones."""
    return numba.types.Tuple([_RO_BYTES, _U64_ARRAY, _U64_ARRAY])


def _os_cache_reader(self):
    """The compiled ``(address, state) -> bytes`` read of the OS-cache manager (a read-only view of
    the memory-mapped file: the sample at ``address``, its size looked up in the pointer table)."""
    def read(address, mem_state):
        data, ptrs, sizes = mem_state
        size = sizes[np.searchsorted(ptrs, address)]
        return data[address:address + size]

    return Compiler.compile(read, _RO_BYTES(numba.types.uint64, self.state_type))


def _fix_ffcv_state_types() -> None:
    """Stop FFCV's OS-cache memory manager from mutating numba's shared (interned) array types.

    FFCV 1.0.2 writes ``t = numba.uint8[::1]; t.mutable = False``: ``t`` is the process-wide
    ``Array(uint8, 1, 'C')`` object, so its hash changes while it is a key in numba's dictionaries
    (the ``overloads`` of every dispatcher compiled with such an argument), which then raise
    ``KeyError`` when iterated: intermittently while a pipeline thread type-infers its decoder,
    always in those dispatchers' finalizers. Only the OS-cache manager is replaced (the backend
    always uses it). Idempotent."""
    OSCacheManager.state_type = property(_os_cache_state_type)
    OSCacheManager.compile_reader = _os_cache_reader


_fix_ffcv_state_types()

# --------------------------------------------------------------------------------------------
# The plan, compiled: tl_fast.rng and tl_fast.plan.random_resized_crop for one sample
# --------------------------------------------------------------------------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0
_MASK64 = 0xFFFFFFFFFFFFFFFF


@numba.njit(cache=False, fastmath=False)
def _mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=False, fastmath=False)
def nb_hash(seed, epoch, key, stream):
    """:func:`tl_fast.rng.hash_keys` for one key (all arguments uint64)."""
    h = _mix64(seed + _GOLDEN)
    h = _mix64(h ^ (epoch + _GOLDEN))
    h = _mix64(h ^ (stream * _GOLDEN))
    return _mix64(h ^ (key * _GOLDEN + np.uint64(1)))


@numba.njit(cache=False, fastmath=False)
def nb_uniform(base, j):
    """Draw ``j`` (0-based) of :func:`tl_fast.rng.uniform` from a key's hash ``base``."""
    d = _mix64(base + np.uint64(j + 1) * _GOLDEN)
    return np.float64(d >> np.uint64(11)) * _INV53


@numba.njit(cache=False, fastmath=False)
def nb_random_resized_crop(seed, epoch, key, height, width, s0, s1, lr0, lr1, rmin, rmax):
    """:func:`tl_fast.plan.random_resized_crop` for one sample: ``(top, left, h, w)``."""
    base = nb_hash(seed, epoch, key, np.uint64(_S_CROP))
    fh = np.float64(height)
    fw = np.float64(width)
    area = fh * fw
    for a in range(10):
        target_area = area * (s0 + nb_uniform(base, 4 * a) * (s1 - s0))
        aspect = np.exp(lr0 + nb_uniform(base, 4 * a + 1) * (lr1 - lr0))
        w = np.rint(np.sqrt(target_area * aspect))
        h = np.rint(np.sqrt(target_area / aspect))
        if w > 0 and w <= fw and h > 0 and h <= fh:
            top = np.floor(nb_uniform(base, 4 * a + 2) * (fh - h + 1))
            left = np.floor(nb_uniform(base, 4 * a + 3) * (fw - w + 1))
            return np.int64(top), np.int64(left), np.int64(h), np.int64(w)
    in_ratio = fw / fh
    if in_ratio < rmin:
        cw = fw
        ch = np.rint(fw / rmin)
    elif in_ratio > rmax:
        cw = np.rint(fh * rmax)
        ch = fh
    else:
        cw = fw
        ch = fh
    return np.int64((fh - ch) // 2), np.int64((fw - cw) // 2), np.int64(ch), np.int64(cw)


@numba.njit(cache=False, fastmath=False)
def nb_center_crop(height, width, crop_pct):
    """:func:`tl_fast.plan.center_crop_plan`'s crop for one sample."""
    side = max(np.floor(min(height, width) * crop_pct), 1.0)
    top = np.rint((height - side) / 2.0)
    left = np.rint((width - side) / 2.0)
    return np.int64(top), np.int64(left), np.int64(side), np.int64(side)


@numba.njit(cache=False, fastmath=False)
def nb_flip(seed, epoch, key, hflip):
    return nb_uniform(nb_hash(seed, epoch, key, np.uint64(_S_FLIP)), 0) < hflip


def plan_crops_numba(maker: PlanMaker, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The compiled plan for ``indices`` (``crop [B, 4]``, ``flip [B]``), to test against the numpy plan."""
    fn = _crop_function(maker)
    crops = np.zeros((len(indices), 4), np.int64)
    flips = np.zeros(len(indices), bool)
    for b, i in enumerate(indices):
        h, w = maker.sizes[i]
        t, l, ch, cw, f = fn(np.uint64(i), np.int64(h), np.int64(w), np.uint64(maker.epoch & _MASK64))
        crops[b] = (t, l, ch, cw)
        flips[b] = f
    return crops, flips


def _crop_function(maker: PlanMaker):
    """A compiled ``(key, height, width, epoch) -> (top, left, h, w, flip)`` for the maker's seed
    and augmentation (the epoch is a run-time argument)."""
    seed = np.uint64(maker.seed & _MASK64)
    if maker.augment is None:
        crop_pct = float(maker.crop_pct)

        @numba.njit(cache=False, fastmath=False)
        def crop(key, height, width, epoch):
            t, l, h, w = nb_center_crop(height, width, crop_pct)
            return t, l, h, w, False
        return crop
    aug = maker.augment
    s0, s1 = float(aug.scale[0]), float(aug.scale[1])
    lr0, lr1 = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    rmin, rmax = float(min(aug.ratio)), float(max(aug.ratio))
    hflip = float(aug.hflip)

    @numba.njit(cache=False, fastmath=False)
    def crop(key, height, width, epoch):
        t, l, h, w = nb_random_resized_crop(seed, epoch, key, height, width, s0, s1, lr0, lr1, rmin, rmax)
        return t, l, h, w, nb_flip(seed, epoch, key, hflip)
    return crop


# --------------------------------------------------------------------------------------------
# Field and decoder
# --------------------------------------------------------------------------------------------

class PlanRGBImageField(RGBImageField):
    """RGB image field that also records the original image size (before any pack-time downscale).

    ``encode`` takes ``(jpeg_bytes uint8 [n], stored_height, stored_width, orig_height, orig_width)``."""

    def __init__(self) -> None:
        super().__init__(write_mode="jpg")

    @property
    def metadata_type(self) -> np.dtype:
        return np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8"),
                         ("orig_height", "<u4"), ("orig_width", "<u4"), ("epoch", "<u8")])

    @staticmethod
    def from_binary(binary) -> "PlanRGBImageField":
        return PlanRGBImageField()

    def encode(self, destination, value, malloc) -> None:
        data, height, width, orig_height, orig_width = value
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        destination["mode"] = IMAGE_MODES["jpg"]
        destination["height"], destination["width"] = height, width
        destination["orig_height"], destination["orig_width"] = orig_height, orig_width
        destination["epoch"] = 0  # set in memory by the loader before each epoch
        destination["data_ptr"], storage = malloc(data.nbytes)
        storage[:] = data


class PlanCropDecoder(ResizedCropRGBImageDecoder):
    """FFCV's resized-crop decoder with the crop (and flip) taken from the geometry plan."""

    def __init__(self, maker: PlanMaker, output_size: int) -> None:
        super().__init__((output_size, output_size))
        self.maker = maker

    @property
    def get_crop_generator(self):  # required by the abstract base; the plan replaces it
        raise NotImplementedError("PlanCropDecoder takes its crops from the plan")

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_c = _crop_function(self.maker)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                oh = np.int64(field["orig_height"])
                ow = np.int64(field["orig_width"])
                top, left, ch, cw, flip = crop_c(np.uint64(source_ix), oh, ow, np.uint64(field["epoch"]))
                if oh != height or ow != width:  # stored downscaled: map the box proportionally
                    sy = np.float64(height) / np.float64(oh)
                    sx = np.float64(width) / np.float64(ow)
                    top2 = min(np.int64(np.rint(top * sy)), np.int64(height) - 1)
                    left2 = min(np.int64(np.rint(left * sx)), np.int64(width) - 1)
                    bottom = max(min(np.int64(np.rint((top + ch) * sy)), np.int64(height)), top2 + 1)
                    right = max(min(np.int64(np.rint((left + cw) * sx)), np.int64(width)), left2 + 1)
                    top, left, ch, cw = top2, left2, bottom - top2, right - left2
                out = destination[dst_ix]
                resize_crop_c(temp_buffer, top, top + ch, left, left + cw, out)
                if flip:
                    n = out.shape[1]
                    for r in range(out.shape[0]):
                        for c in range(n // 2):
                            for k in range(3):
                                tmp = out[r, c, k]
                                out[r, c, k] = out[r, n - 1 - c, k]
                                out[r, n - 1 - c, k] = tmp
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


# --------------------------------------------------------------------------------------------
# Guarded loader: pipeline errors surface, stalls time out
# --------------------------------------------------------------------------------------------

class _PipelineFailure:
    def __init__(self, error: BaseException, samples) -> None:
        self.error = error
        self.samples = samples  # the sample ids of the batch being built, or None


class _GuardedEpochIterator(EpochIterator):
    def __init__(self, loader: "_GuardedLoader", order: Sequence[int]) -> None:
        # Set once the first batch is decoded (the pipeline is compiled then) or the thread ends.
        self.first_batch_done = threading.Event()
        super().__init__(loader, order)  # starts the thread

    def run_pipeline(self, b_ix, batch_indices, *args, **kwargs):
        self.current_samples = batch_indices  # named in the error if this batch fails
        try:
            return super().run_pipeline(b_ix, batch_indices, *args, **kwargs)
        finally:
            self.first_batch_done.set()

    def run(self) -> None:
        try:
            super().run()
        except BaseException as err:  # forwarded to the consumer instead of dying silently
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(_PipelineFailure(err, getattr(self, "current_samples", None)), timeout=0.5)
                    return
                except Exception:
                    continue
        finally:
            self.first_batch_done.set()

    def wait_first_batch(self, timeout: float) -> None:
        """Block until the pipeline thread has compiled its code and decoded the first batch, so the
        compilation does not run alongside the caller's Python work (see the module docstring)."""
        if not self.first_batch_done.wait(timeout):
            self.shutdown(1.0)
            raise TimeoutError(f"FFCV pipeline did not decode its first batch within {timeout:.0f} s "
                               "(stalled decoder thread?)")

    def __next__(self):
        timeout = getattr(self.loader, "timeout_s", 300.0)
        try:
            result = self.output_queue.get(timeout=timeout)
        except Empty:
            self.close()
            raise TimeoutError(f"FFCV pipeline produced no batch for {timeout:.0f} s (stalled decoder thread?)") from None
        if result is None:
            self.close()
            raise StopIteration
        if isinstance(result, _PipelineFailure):
            self.close()
            where = ""
            if result.samples is not None:
                ids = [int(i) for i in np.asarray(result.samples).reshape(-1)]
                name = getattr(self.loader, "sample_name", lambda i: f"sample {i}")
                where = (f" on a batch of {len(ids)} images ({', '.join(name(i) for i in ids[:4])}"
                         f"{', ...' if len(ids) > 4 else ''})")
            raise RuntimeError(f"FFCV pipeline failed{where}: {type(result.error).__name__}: {result.error}") \
                from result.error
        slot, result = result
        if torch.cuda.is_available():
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result


    def shutdown(self, timeout: float) -> None:
        """Stop the pipeline thread and wait for it (draining the queue it may be blocked on)."""
        self.close()
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            try:
                self.output_queue.get_nowait()
            except Empty:
                pass
            self.join(0.05)


class _GuardedLoader(Loader):
    timeout_s: float = 300.0

    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        it = _GuardedEpochIterator(self, selected)
        it.wait_first_batch(self.timeout_s)
        return it


# --------------------------------------------------------------------------------------------
# Packed file description and the backend
# --------------------------------------------------------------------------------------------

@dataclass
class PackedInfo:
    path: str
    classes: list[str]
    num_classes: int
    topk: int | None  # None (and map_size None) when packed without labels
    map_size: tuple[int, int] | None
    has_records: bool
    sizes: np.ndarray  # [N, 2] original (height, width)
    stored_sizes: np.ndarray  # [N, 2] as stored
    targets: np.ndarray  # [N] int64
    valid_ids: np.ndarray  # samples that decoded at pack time
    record_lengths: np.ndarray | None  # [N]; None without records
    num_invalid: int
    num_one_hot: int
    skipped: list  # [(relative path, reason)]: left out at indexing or pack time
    paths: list[str] | None  # relative source path of every sample (None: an older file)
    image_hashes: np.ndarray | None  # uint64 [N] fingerprint hashes of the packed image bytes
    image_spans: tuple[np.ndarray, np.ndarray]  # (offset, size) of every sample's image bytes in the file


def read_packed(path: str | os.PathLike) -> PackedInfo:
    """Read a packed file's description (sidecar JSON) and per-sample metadata (host side)."""
    from ffcv.reader import Reader

    path = str(path)
    if os.path.isdir(path) or not os.path.isfile(path):
        raise ValueError(f"backend='ffcv' reads a .beton written by `tl-fast pack-ffcv IMAGES STORE OUT.beton` "
                         f"(or `IMAGES OUT.beton --no-labels`); {path} is not such a file")
    meta_path = path + META_SUFFIX
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} has no {os.path.basename(meta_path)} beside it: was it written by tl-fast "
                         "pack-ffcv? (repack it)") from None
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_FORMAT_VERSIONS:
        raise ValueError(f"{meta_path}: not a {FORMAT} description of version "
                         f"{' or '.join(map(str, READABLE_FORMAT_VERSIONS))} (repack it with this tl_fast)")
    reader = Reader(path, custom_handlers={"image": PlanRGBImageField})
    md = reader.metadata
    if len(md) != meta["num_samples"]:
        raise ValueError(f"{path} holds {len(md)} samples but {meta_path} says {meta['num_samples']}: files mismatch")
    has_records = bool(meta["has_records"])
    n_fields = len(FIELDS) if has_records else len(FIELDS) - 1
    if len(md.dtype.names) != n_fields:
        raise ValueError(f"{path} has {len(md.dtype.names)} fields but {meta_path} describes {n_fields}: "
                         "files mismatch")
    img, label = md[f"f{FIELDS.index('image')}"], md[f"f{FIELDS.index('label')}"]
    record_lengths = np.asarray(md[f"f{FIELDS.index('record')}"]["size"], dtype=np.int64) if has_records else None
    sizes = np.stack([img["orig_height"], img["orig_width"]], 1).astype(np.int64)
    valid = np.asarray(meta.get("invalid", []), dtype=np.int64)
    valid_mask = np.ones(len(md), bool)
    valid_mask[valid] = False
    return PackedInfo(
        path=path, classes=list(meta["classes"]), num_classes=int(meta["num_classes"]),
        topk=int(meta["topk"]) if has_records else None, map_size=tuple(meta["map_size"]) if has_records else None,
        has_records=has_records, sizes=sizes,
        stored_sizes=np.stack([img["height"], img["width"]], 1).astype(np.int64),
        targets=np.asarray(label, dtype=np.int64).reshape(-1), valid_ids=np.flatnonzero(valid_mask).astype(np.int64),
        record_lengths=record_lengths, num_invalid=int((~valid_mask).sum()),
        num_one_hot=int(meta.get("num_one_hot", 0)),
        skipped=[tuple(s) for s in meta.get("skipped", [])], paths=meta.get("paths"),
        image_hashes=(np.frombuffer(base64.b64decode(meta["image_hashes"]), "<u8").astype(np.uint64)
                      if "image_hashes" in meta else None),
        image_spans=packed_image_spans(reader))


def packed_image_spans(reader) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, sizes)`` (int64 ``[N]``) of every sample's image bytes in a ``.beton``, from its
    image metadata and allocation table."""
    md = reader.metadata[f"f{FIELDS.index('image')}"]
    ptrs = np.asarray(md["data_ptr"], dtype=np.int64)
    table = reader.alloc_table
    order = np.argsort(table["ptr"], kind="stable")
    sorted_ptrs = np.asarray(table["ptr"], dtype=np.int64)[order]
    pos = np.clip(np.searchsorted(sorted_ptrs, ptrs), 0, max(len(sorted_ptrs) - 1, 0))
    if len(sorted_ptrs) == 0 or np.any(sorted_ptrs[pos] != ptrs):
        raise ValueError(f"{reader.file_name}: image pointers missing from the allocation table; the file is damaged")
    return ptrs, np.asarray(table["size"], dtype=np.int64)[order][pos]


@numba.njit(nogil=True, cache=True)
def _normalized_chw(src, table, out):  # pragma: no cover - compiled
    """``out[b, c, y, x] = table[c, src[b, y, x, c]]``: FFCV's uint8 HWC batch to normalized float32
    CHW in one pass (the copy out of FFCV's buffer and the normalization look-up together)."""
    for b in range(src.shape[0]):
        for c in range(3):
            levels = table[c]
            for y in range(src.shape[1]):
                for x in range(src.shape[2]):
                    out[b, c, y, x] = levels[src[b, y, x, c]]


def _normalize_table() -> np.ndarray:
    """float32 ``[3, 256]``: each level normalized exactly as :func:`tl_fast.augment.normalize` does."""
    from ..augment import normalize

    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256).expand(1, 3, 1, 256).clone()
    return np.ascontiguousarray(normalize(levels).view(3, 256).numpy())


class FFCVBackend:
    name = "ffcv"
    normalizes = False

    def __init__(self, path: str | os.PathLike, config: LoaderConfig, device: torch.device, *, with_records: bool) -> None:
        self.path = str(path)
        self.info = read_packed(self.path)
        if with_records and not self.info.has_records:
            raise ValueError(f"{self.path} was packed without label records: repack it with a label store")
        self.config = config
        self.device = device
        self.with_records = with_records
        # On the CPU without RandAugment pixel operations the batch leaves FFCV's buffer normalized,
        # in the same pass that copies it out; on a GPU uint8 crosses the bus and normalizes there.
        self.normalizes = device.type == "cpu" and not config.device_pixel_ops
        self._table = _normalize_table() if self.normalizes else None
        st = os.stat(self.path)
        self._identity = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r") if self.info.image_hashes is not None else None
        self._loader: _GuardedLoader | None = None
        self._compiled_for: tuple | None = None
        self._active: _GuardedEpochIterator | None = None

    def sample_name(self, i: int) -> str:
        """The source image of sample ``i`` (its relative path, when the file records it)."""
        return self.info.paths[i] if self.info.paths is not None else f"sample {i}"

    def check_unchanged(self) -> None:
        """Raise if the ``.beton`` was modified, truncated or replaced since it was opened."""
        try:
            st = os.stat(self.path)
        except OSError as err:
            raise RuntimeError(f"{self.path}: the packed file is gone ({err.strerror}): it was deleted or moved "
                               "under a running loader") from None
        now = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        if now != self._identity:
            what = (f"its size went from {self._identity[0]} to {now[0]} bytes" if now[0] != self._identity[0]
                    else "it was replaced" if now[2:] != self._identity[2:] else "it was rewritten in place")
            raise RuntimeError(f"{self.path}: the packed file changed since the loader opened it ({what}): do not "
                               "rewrite a .beton under a running loader; restart the loader on the new file")

    def check_images(self, idx: np.ndarray) -> None:
        """Raise naming the images whose packed bytes no longer match their pack-time fingerprints
        (one hash of two 2 KB windows per image, off the decoder threads)."""
        if self._bytes is None:
            return
        self.check_unchanged()  # hashing a shrunken map would be SIGBUS
        offsets, sizes = self.info.image_spans
        got = packed_fingerprints(self._bytes, offsets[idx], sizes[idx])
        bad = np.flatnonzero(got != self.info.image_hashes[idx])
        if bad.size:
            names = ", ".join(self.sample_name(int(idx[b])) for b in bad[:3])
            raise RuntimeError(f"{self.path}: the packed bytes of {bad.size} image(s) in this batch changed since "
                               f"pack time ({names}): the file was modified; repack it with tl-fast pack-ffcv")

    def _ffcv_loader(self, maker: PlanMaker, order: np.ndarray) -> _GuardedLoader:
        """The FFCV loader, built (and compiled) on first use, then re-pointed at each epoch's order."""
        from ffcv.traversal_order.sequential import Sequential

        key = (maker.seed, maker.augment, maker.crop_pct)
        if self._loader is None:
            cfg = self.config
            pipelines = {
                "image": [PlanCropDecoder(maker, cfg.image_size)],
                "label": None,
                "index": [IntDecoder()],
                "record": [BytesDecoder()] if self.with_records else None,
            }
            self._loader = _GuardedLoader(
                self.path, batch_size=cfg.batch_size, num_workers=max(1, int(cfg.num_workers)),
                order=OrderOption.SEQUENTIAL, indices=order, pipelines=pipelines, drop_last=False,
                custom_fields={"image": PlanRGBImageField}, batches_ahead=2, os_cache=True)
            self._loader.timeout_s = cfg.timeout_s
            self._loader.sample_name = self.sample_name
            self._compiled_for = key
        elif key != self._compiled_for:
            raise ValueError("the FFCV decoder was compiled for another seed / augmentation")
        loader = self._loader
        loader.indices = order
        loader.traversal_order = Sequential(loader)
        loader.first_traversal_order = order
        return loader

    def iterate(self, batches: Sequence[np.ndarray], plan: PlanMaker) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        if not batches:
            return
        # The decoder's plan needs the original sizes; they are the packed ones by construction.
        maker = replace(plan, sizes=self.info.sizes)
        order = np.concatenate([np.asarray(b, dtype=np.uint64) for b in batches])
        if self._active is not None:  # an earlier epoch abandoned mid-way: its thread must be gone first
            self._active.shutdown(self.config.timeout_s)
            self._active = None
        loader = self._ffcv_loader(maker, order)
        metadata = loader.reader.metadata
        metadata.setflags(write=True)
        metadata[f"f{FIELDS.index('image')}"]["epoch"] = np.uint64(maker.epoch & _MASK64)
        it = iter(loader)
        self._active = it
        try:
            for out in it:
                if self.normalizes:
                    b, h, w, _ = out[0].shape
                    images = new_output((b, 3, h, w), torch.float32, torch.device("cpu"))
                    _normalized_chw(out[0], self._table, images.numpy())  # copies out of FFCV's buffer
                else:
                    images = torch.from_numpy(out[0]).permute(0, 3, 1, 2).contiguous()  # copy out of FFCV's buffer
                idx = np.asarray(out[1], dtype=np.int64).reshape(-1)
                self.check_images(idx)
                extras = {}
                if self.with_records:
                    extras["records"] = np.array(out[2])
                    extras["record_lengths"] = self.info.record_lengths[idx]
                if self.device.type == "cuda":
                    images = images.pin_memory()
                yield images, idx, extras
        finally:
            # The pipeline thread must be gone before the next epoch rewrites the epoch column.
            it.shutdown(self.config.timeout_s)
            if self._active is it:
                self._active = None
