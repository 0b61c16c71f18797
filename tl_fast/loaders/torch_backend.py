"""PyTorch backend: ``DataLoader`` workers decode with ``torchvision.io``, crop by the plan's pixel
box, resize to S (antialiased bilinear), flip, and return uint8 batches with their label maps.

A worker builds whole batches: the DataLoader's sampler is the epoch's plans, so a worker receives
each batch's :class:`tl_fast.plan.BatchPlan` (drawn once, in the main process) and cuts the images
by it. It writes the batch's images, and decodes its label maps (``LabelStore.read(..., out=)``),
straight into one slot of a shared-memory ring that the main process allocated once
(:class:`_SlotRing`): only the plan and the slot's number travel through the DataLoader's queues.
A decode failure raises in the main process with the image's path (the DataLoader re-raises worker
exceptions); a stalled worker raises after ``timeout_s``.
"""
from __future__ import annotations

import gc
import os
import queue
import weakref
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
# torchvision's modules are imported here, in the parent, rather than on first use: workers are
# forked every epoch, and an import in each of them cost more CPU than a batch.
from torchvision.transforms.v2 import functional as TF

try:  # torchvision's libjpeg-turbo decoder (deprecated since torchvision 0.29 in favour of TorchCodec)
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without it: PIL (the same pixels on 200 JPEGs tried here)
    decode_image = None

from ..plan import BatchPlan
from ..store import TopKMaps
from .batch import LoaderConfig
from .common import EpochPlans, StoreMaps


def decode_rgb(path: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` RGB of the image file at ``path`` (JPEG through libjpeg-turbo, others too):
    torchvision's decoder, or PIL's where torchvision has none."""
    try:
        if decode_image is None:
            return decode_rgb_pil(path)
        data = read_file(path)
        if bytes(data[:2].numpy()) == b"BM":  # BMP, which the index accepts and torchvision cannot decode
            return decode_rgb_pil(path)
        return decode_image(data, mode=ImageReadMode.RGB)
    except Exception as err:  # torchvision raises RuntimeError for bad data; say which file
        raise RuntimeError(f"cannot decode image {path}: {err}") from err


def decode_rgb_pil(path: str) -> torch.Tensor:
    """:func:`decode_rgb` through PIL (EXIF orientation ignored, as torchvision's decoder does)."""
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def crop_resize_flip(image: torch.Tensor, crop: Sequence[int], flip: bool, size: int) -> torch.Tensor:
    """``image[:, top:top+h, left:left+w]`` resized to ``size x size`` (bilinear, antialiased), flipped."""
    top, left, h, w = (int(v) for v in crop)
    out = TF.resize(image[:, top:top + h, left:left + w], [size, size],
                    interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return out.flip(-1) if flip else out


_ALIGN = 16
_PREFETCH = 2  # batches each DataLoader worker may have ready ahead of the main process


def _layout(parts: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[tuple[int, int]], int]:
    """``(offset, nbytes)`` of each of ``parts`` (shape, dtype) laid out one after another, each
    16-byte aligned, and the total size."""
    spans, end = [], 0
    for shape, dtype in parts:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        spans.append((end, nbytes))
        end += -(-nbytes // _ALIGN) * _ALIGN
    return spans, end


def batch_views(buffer: torch.Tensor, parts: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """The tensors ``parts`` (shape, dtype) laid out in the uint8 ``buffer`` by :func:`_layout`."""
    spans, _ = _layout(parts)
    return [buffer[off:off + n].view(dtype).view(shape) for (off, n), (shape, dtype) in zip(spans, parts)]


def _batch_buffer(parts: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> torch.Tensor:
    """One uint8 buffer for a whole batch (images and label maps), for batches no ring slot holds.
    In a DataLoader worker it lives in shared memory from the start: sending it moves no bytes, and
    the batch travels as one file descriptor rather than one per tensor."""
    _, nbytes = _layout(parts)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


_RINGS: "weakref.WeakValueDictionary[str, _SlotRing]" = weakref.WeakValueDictionary()


class _SlotRing:
    """``slots`` batch-sized shared-memory slots per worker, allocated once in the main process
    and reused for every batch of every epoch.

    A fresh shared-memory buffer per batch costs a file descriptor sent over a socket and a mapping
    in the main process, and page faults on both sides as the new pages are first touched
    (BENCHMARKS.md has what that cost). The slots are mapped once and stay mapped. The main process
    hands a slot back to its worker through a queue once it is done with it; a worker that finds
    none free within ``wait_s`` builds that batch in a buffer of its own instead, so a slot never
    holds up a worker for long (or a shutdown), whatever order batches are consumed in."""

    def __init__(self, workers: int, slots: int, slot_bytes: int, wait_s: float = 1.0) -> None:
        self.workers, self.slots, self.wait_s = workers, slots, wait_s
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        nbytes = workers * slots * self.slot_bytes
        try:
            self.memory = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        except RuntimeError as err:
            raise RuntimeError(f"cannot allocate {nbytes / 2**20:.1f} MB of shared memory for {slots} batches per "
                               f"loader worker ({workers} workers): {err}. Make /dev/shm larger (docker run "
                               "--shm-size), or use fewer workers or a smaller batch") from err
        self.key = f"{os.getpid()}-{id(self)}"
        self.freed: list = []
        self._free: list[int] | None = None  # in a worker: its slots free to fill
        _RINGS[self.key] = self

    def start_epoch(self) -> None:
        """Fresh queues for a new set of workers (they are started again every epoch)."""
        ctx = torch.multiprocessing.get_context()
        self.freed = [ctx.Queue() for _ in range(self.workers)]
        for q in self.freed:  # slot numbers left unread at exit must not hold the interpreter up
            q.cancel_join_thread()
        self._free = None

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes

    def acquire(self, worker: int) -> int | None:
        """In worker ``worker``: one of its free slots, or ``None`` if none came free in ``wait_s``."""
        if self._free is None:  # this worker's first batch: all its slots are free
            self._free = list(range(self.slots))
        freed = self.freed[worker]
        try:
            while True:
                self._free.append(freed.get_nowait())
        except queue.Empty:
            pass
        if not self._free:
            try:
                self._free.append(freed.get(timeout=self.wait_s))
            except queue.Empty:
                return None
        return self._free.pop()

    def release(self, worker: int, slot: int) -> None:
        """In the main process: ``slot`` of worker ``worker`` may be filled again."""
        self.freed[worker].put(slot)

    def view(self, worker: int, slot: int, nbytes: int) -> torch.Tensor:
        start = (worker * self.slots + slot) * self.slot_bytes
        return self.memory[start:start + nbytes]


class _WorkerBatch:
    """What a worker returns for one batch: the sample indices, the layout ``parts`` of its bytes
    (:func:`batch_views`), and where the bytes are: slot ``slot`` of worker ``worker`` in the ring
    ``ring_key``, or their own ``buffer``."""

    def __init__(self, idx: np.ndarray, parts, buffer: torch.Tensor | None = None, ring_key: str = "",
                 worker: int = -1, slot: int = -1) -> None:
        self.idx, self.parts, self.buffer = idx, parts, buffer
        self.ring_key, self.worker, self.slot = ring_key, worker, slot

    @property
    def in_ring(self) -> bool:
        return self.buffer is None

    def ring_view(self) -> torch.Tensor:
        return _RINGS[self.ring_key].view(self.worker, self.slot, _layout(self.parts)[1])

    def release(self) -> None:
        _RINGS[self.ring_key].release(self.worker, self.slot)

    def pin_memory(self, device=None) -> "_WorkerBatch":
        """Called by the DataLoader's pin-memory thread (CUDA): the batch copied into pinned memory;
        a ring slot is freed as soon as it is copied."""
        if not self.in_ring:
            return _WorkerBatch(self.idx, self.parts, buffer=self.buffer.pin_memory())
        view = self.ring_view()
        pinned = torch.empty(view.shape, dtype=view.dtype, pin_memory=True).copy_(view)
        self.release()
        return _WorkerBatch(self.idx, self.parts, buffer=pinned)


def _as_is(item):
    """The DataLoader's ``collate_fn`` without batching: items travel as built (the default would
    turn the index array into a tensor, sent through its own file descriptor)."""
    return item


def _worker_init(worker_id: int) -> None:
    """Leave the objects inherited from the parent out of this worker's garbage collections: they
    are long-lived, and traversing them costs time and copy-on-write page faults."""
    gc.freeze()


class _BatchDataset(Dataset):
    """Item ``plan`` (a :class:`BatchPlan`: the DataLoader's sampler yields the epoch's plans) is the
    batch of ``plan.index`` as a :class:`_WorkerBatch`, whose bytes hold the images uint8
    ``[B, 3, S, S]`` and, when ``labels`` reads them, the batch's top-k maps ``values`` and
    ``indices``. In a worker with a ``ring``, the bytes go into the worker's next ring slot."""

    def __init__(self, paths: Sequence[str], sizes: np.ndarray, size: int, labels: StoreMaps | None = None,
                 ring: _SlotRing | None = None) -> None:
        self.paths = paths
        self.sizes = sizes
        self.size = size
        self.labels = labels
        self.ring = ring

    def __getitem__(self, plan: BatchPlan) -> _WorkerBatch:
        idx = np.asarray(plan.index, dtype=np.int64)
        parts = [((len(idx), 3, self.size, self.size), torch.uint8)]
        if self.labels is not None:
            parts += self.labels.parts(len(idx))
        nbytes = _layout(parts)[1]
        worker = torch.utils.data.get_worker_info()
        slot = None
        if worker is not None and self.ring is not None and self.ring.fits(nbytes):
            slot = self.ring.acquire(worker.id)
        if slot is not None:
            batch = _WorkerBatch(idx, parts, ring_key=self.ring.key, worker=worker.id, slot=slot)
            buffer = self.ring.view(worker.id, slot, nbytes)
        else:
            buffer = _batch_buffer(parts)
            batch = _WorkerBatch(idx, parts, buffer=buffer)
        out, *map_views = batch_views(buffer, parts)
        if self.labels is not None:
            self.labels(idx, out=TopKMaps(*map_views))
        for b, j in enumerate(idx):
            path = self.paths[j]
            image = decode_rgb(path)
            expected = tuple(int(v) for v in self.sizes[j])
            if tuple(image.shape[1:]) != expected:
                raise RuntimeError(f"{path} decodes to {tuple(image.shape[1:])} but was indexed as {expected} "
                                   "(height, width): the file changed after indexing; delete the index cache")
            out[b] = crop_resize_flip(image, plan.crop[b], bool(plan.flip[b]), self.size)
        return batch


class TorchBackend:
    name = "torch"
    normalizes = False

    def __init__(self, paths: Sequence[str], sizes: np.ndarray, config: LoaderConfig, device: torch.device,
                 labels: StoreMaps | None = None) -> None:
        self.paths = list(paths)
        self.sizes = np.asarray(sizes)
        self.config = config
        self.device = device
        self.labels = labels
        self._ring: _SlotRing | None = None
        self._ring_in_use = False  # by a live iteration: a second one at the same time gets none
        if labels is not None and (labels.record >= 0).any():
            # Compile the record decoder here, once, rather than in every worker forked each epoch.
            labels(np.flatnonzero(labels.record >= 0)[:1])

    def _slot_ring(self, workers: int) -> _SlotRing | None:
        """The ring for ``workers`` workers: slots for the batches a worker may have ahead
        (the DataLoader's prefetch) plus the one the main process is using. Only for CPU and
        CUDA, where the main process is done with a slot when it asks for the next batch (CPU) or
        has copied it into pinned memory (CUDA)."""
        if workers == 0 or self.device.type not in ("cpu", "cuda"):
            return None
        if self._ring is None or self._ring.workers != workers:
            b, size = self.config.batch_size, self.config.image_size
            parts = [((b, 3, size, size), torch.uint8)]
            if self.labels is not None:
                parts += self.labels.parts(b)
            self._ring = _SlotRing(workers, _PREFETCH + 1, _layout(parts)[1])
        self._ring.start_epoch()
        return self._ring

    def iterate(self, plans: EpochPlans) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        cfg = self.config
        workers = max(0, int(cfg.num_workers))
        ring = None if self._ring_in_use else self._slot_ring(workers)
        loader = DataLoader(
            _BatchDataset(self.paths, self.sizes, cfg.image_size, self.labels, ring), batch_size=None,
            sampler=plans, num_workers=workers, pin_memory=self.device.type == "cuda",
            timeout=cfg.timeout_s if workers else 0, prefetch_factor=_PREFETCH if workers else None,
            worker_init_fn=_worker_init if workers else None, collate_fn=_as_is,
        )
        self._ring_in_use = ring is not None
        try:
            # The DataLoader's workers are shut down when _deliver ends or is closed, before the
            # ring is free for the next iteration.
            yield from _deliver(loader)
        finally:
            if ring is not None:
                self._ring_in_use = False


def _deliver(loader: DataLoader) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
    """The batches of ``loader`` as ``(images, indices, extras)``; a ring slot is handed back when
    the next batch is asked for (the loader has augmented the images into new memory by then)."""
    for batch in loader:
        images, *maps = batch_views(batch.ring_view() if batch.in_ring else batch.buffer, batch.parts)
        if batch.in_ring:  # the slot is reused once handed back: the batch keeps its own maps
            maps = [m.clone() for m in maps]
        yield images, np.asarray(batch.idx), {"maps": TopKMaps(*maps)} if maps else {}
        if batch.in_ring:
            batch.release()
