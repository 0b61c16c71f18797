"""The FFCV backend: one compiled FFCV loader over a tl_fast ``.beton`` serves every epoch.

Each epoch's order is this rank's shard, in order, with sequential traversal: the loader does its
own sharding (the same for every backend) instead of FFCV's ``distributed=True``, which would pad
the shard with repeated samples. Before FFCV decodes batch ``i`` (on its pipeline thread), the
backend writes that batch's plan — the same :class:`tl_fast.plan.BatchPlan` object the loader then
finishes the batch with — into the plan columns the decoder reads (:mod:`.field`), with the rows
of the batch's own tensor, which the decoder writes in FFCV's parallel loop (:mod:`.output`): the
batch leaves FFCV with no copy, normalized on the CPU, pinned uint8 for a GPU.

Label records are packed as a bytes field (uint8; numba has no float16) and come out of FFCV with
the batch's images; the backend decodes them right there (:func:`tl_fast.store.decode_records`,
in the thread that receives FFCV's batches) straight into the batch's map buffer, pinned for a
GPU. A file packed without labels has no such field (``has_records`` false in its JSON); it serves
loaders without token labels only.

Every packed image's bytes are hashed at pack time (version 4); the memory read the pipeline uses
hashes them again before they are decoded and flags a mismatch, and the backend refuses a batch
with a flagged image, naming it (:mod:`tl_fast.loaders.packed_hash`).
"""
from __future__ import annotations

import os
import time
from typing import Iterator

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.bytes import BytesDecoder
from ffcv.loader import OrderOption

from ...imagecheck import packed_fingerprints
from ..batch import LoaderConfig
from ..common import EpochPlans, empty_maps, map_parts
from ..packed_hash import allocation_table
from .field import PlanCropDecoder, PlanRGBImageField, add_plan_columns, write_plan
from .guard import _GuardedEpochIterator, _GuardedLoader
from .output import batch_output, normalize_table
from .packed import PackedInfo, read_packed


class FFCVBackend:
    name = "ffcv"
    normalizes = False

    def __init__(self, path: str | os.PathLike, config: LoaderConfig, device: torch.device, *, with_records: bool,
                 info: PackedInfo | None = None) -> None:
        self.path = str(path)
        self.info = info if info is not None else read_packed(self.path)
        if with_records and not self.info.has_records:
            raise ValueError(f"{self.path} was packed without label records: repack it with a label store")
        self.config = config
        self.device = device
        self.with_records = with_records
        # On the CPU without RandAugment pixel operations the decoder writes the batch normalized;
        # on a GPU uint8 crosses the bus and normalizes there. Read when the loader is built.
        self.normalizes = device.type == "cpu" and not config.device_pixel_ops
        st = os.stat(self.path)
        self._identity = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r") if self.info.image_hashes is not None else None
        self._changed: np.ndarray | None = None  # per allocation, set by the pipeline's checked read
        self._image_alloc: np.ndarray | None = None  # per sample, its image's allocation
        self._loader: _GuardedLoader | None = None
        self._plan_columns: np.ndarray | None = None
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
        """Raise naming the images whose packed bytes no longer match their pack-time hashes: the
        flags the pipeline's read set while hashing every byte it decoded (version 4), or, for a
        version 3 file, one hash of two 2 KB windows per image here."""
        if self._changed is not None:
            self.check_unchanged()
            bad = np.flatnonzero(self._changed[self._image_alloc[idx]])
        elif self._bytes is not None:
            self.check_unchanged()  # hashing a shrunken map would be SIGBUS
            offsets, sizes = self.info.image_spans
            got = packed_fingerprints(self._bytes, offsets[idx], sizes[idx])
            bad = np.flatnonzero(got != self.info.image_hashes[idx])
        else:
            return
        if bad.size:
            names = ", ".join(self.sample_name(int(idx[b])) for b in bad[:3])
            raise RuntimeError(f"{self.path}: the packed bytes of {bad.size} image(s) in this batch changed since "
                               f"pack time ({names}): the file was modified; repack it with tl-fast pack-ffcv")

    def _labels(self, records: np.ndarray, idx: np.ndarray) -> dict:
        """The batch's maps, decoded from the records FFCV delivered with its images (padded rows of
        FFCV's buffer) into a fresh buffer; a damaged record names its image."""
        from ...store import RecordError, StoreError, decode_records

        t0 = time.perf_counter()
        info = self.info
        parts = map_parts(len(idx), info.num_classes, info.topk, info.map_size)
        out = empty_maps(parts, pin=self.device.type == "cuda")
        try:
            maps = decode_records(records, info.num_classes, info.topk, info.map_size,
                                  lengths=info.record_lengths[idx], out=out)
        except RecordError as err:
            raise StoreError(f"{self.path}: the label record packed for {self.sample_name(int(idx[err.position]))} is "
                             f"damaged ({err.reason}): repack the file with tl-fast pack-ffcv") from None
        return {"maps": maps, "label_s": time.perf_counter() - t0}

    def _ffcv_loader(self, order: np.ndarray) -> _GuardedLoader:
        """The FFCV loader, built (and compiled) on first use, then re-pointed at each epoch's order."""
        from ffcv.traversal_order.sequential import Sequential

        if self._loader is None:
            cfg = self.config
            pipelines = {
                "image": [PlanCropDecoder(cfg.image_size, normalize_table() if self.normalizes else None)],
                "label": None,
                "index": [IntDecoder()],
                "record": [BytesDecoder()] if self.with_records else None,
            }
            self._loader = _GuardedLoader(
                self.path, batch_size=cfg.batch_size, num_workers=max(1, int(cfg.num_workers)),
                order=OrderOption.SEQUENTIAL, indices=order, pipelines=pipelines, drop_last=False,
                custom_fields={"image": PlanRGBImageField}, batches_ahead=2, os_cache=True)
            self._loader.timeout_s = cfg.timeout_s
            if self.info.content_hashes is not None:  # read by the pipeline's checked read
                manager = self._loader.memory_manager
                manager.expected_hashes, self._image_alloc = allocation_table(
                    np.asarray(manager.ptrs, np.uint64), self.info.image_spans[0].astype(np.uint64),
                    self.info.content_hashes)
                manager.changed = self._changed = np.zeros(len(manager.ptrs), np.uint8)
            self._loader.sample_name = self.sample_name
            self._plan_columns = add_plan_columns(self._loader)
        loader = self._loader
        loader.indices = order
        loader.traversal_order = Sequential(loader)
        loader.first_traversal_order = order
        return loader

    def iterate(self, plans: EpochPlans) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        if not plans.batches:
            return
        order = np.concatenate([b.astype(np.uint64) for b in plans.batches])
        if self._active is not None:  # an earlier epoch abandoned mid-way: its thread must be gone first
            self._active.shutdown(self.config.timeout_s)
            self._active = None
        loader = self._ffcv_loader(order)
        columns = self._plan_columns
        size, normalized, pin = self.config.image_size, self.normalizes, self.device.type == "cuda"
        outputs: dict[int, torch.Tensor] = {}  # batch -> its tensor, from allocation until delivery

        def before_batch(b_ix: int, sample_ids: np.ndarray) -> None:
            # On FFCV's pipeline thread, before batch b_ix is decoded: FFCV's batches are the plan's
            # (the order's consecutive batch_size chunks), each sample once per epoch.
            plan = plans[b_ix]
            outputs[b_ix], rows = batch_output(len(plan.index), size, normalized, pin)
            write_plan(columns, plan.index, plan.crop, plan.flip, rows)

        loader.before_batch = before_batch
        it = iter(loader)
        it.outputs = outputs  # lives as long as the thread that writes into them
        self._active = it
        try:
            for b_ix, out in enumerate(it):
                images = outputs.pop(b_ix)  # written by the decoder; FFCV's own buffer is scratch
                idx = np.asarray(out[1], dtype=np.int64).reshape(-1)
                self.check_images(idx)
                extras = self._labels(out[2], idx) if self.with_records else {}
                yield images, idx, extras
        finally:
            # The pipeline thread must be gone before the next epoch writes the plan columns; one
            # that outlives the wait keeps its output tensors (it.outputs) and is waited for again.
            it.shutdown(self.config.timeout_s)
            if self._active is it and not it.is_alive():
                self._active = None
