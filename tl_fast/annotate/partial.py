"""Resumable partial results: ``STORE.partial/`` holds one finished *block* of images per file.

The image list is cut into blocks of ``block_size`` images (block ``j`` = images
``[j * block_size, (j + 1) * block_size)``). A block is the unit of work and of resume: whichever rank
annotates it writes ``block-NNNNNNNN.tls``, a complete label store of that block's records written
atomically by :class:`tl_fast.store.StoreWriter`, with the block's image-level predictions and skips
in its metadata. A rank killed mid-block loses only that block; a re-run, with any number of ranks,
deals out the blocks that have no file. ``meta.json`` binds the folder to one set of settings,
weights and images (a fingerprint) and to its block size.

The records are encoded here, on a writer thread beside the inference loop, so assembling the final
store is a byte copy of the blocks (:meth:`tl_fast.store.StoreWriter.copy_from`).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..store import LabelStore, StoreWriter

PARTIAL_SUFFIX = ".partial"
PARTIAL_VERSION = 2
BLOCK_META = "annotate_block"
PRED_TOPK = 5  # image-level predictions kept per image, for the top-1 / top-5 report


def partial_folder(store: str | os.PathLike) -> Path:
    store = Path(store)
    return store.with_name(store.name + PARTIAL_SUFFIX)


class PartialResults:
    """The ``STORE.partial/`` folder: ``meta.json`` and ``block-NNNNNNNN.tls`` files."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.meta = self.folder / "meta.json"

    def block_path(self, j: int) -> Path:
        return self.folder / f"block-{j:08d}.tls"

    def prepare(self, fingerprint: str, block_size: int, restart: bool) -> int:
        """Create the folder, or check an existing one belongs to this run (one process, rank 0).
        Returns the block size in force: an earlier run's, when resuming."""
        has_blocks = self.folder.is_dir() and any(self.folder.glob("block-*.tls"))
        # Nothing to lose without finished blocks: a stale or foreign folder is replaced.
        if self.folder.exists() and (restart or not has_blocks or not self.meta.is_file()):
            shutil.rmtree(self.folder)
        if self.meta.is_file():
            found = self._read_meta()
            if found.get("version") != PARTIAL_VERSION or found.get("fingerprint") != fingerprint:
                raise RuntimeError(f"{self.folder} holds partial results of a run with other settings, weights or "
                                   "images; pass --restart to discard them (or delete the folder)")
            block_size = int(found["block_size"])
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / "meta.json.tmp"
            tmp.write_text(json.dumps({"version": PARTIAL_VERSION, "fingerprint": fingerprint,
                                       "block_size": int(block_size)}))
            os.replace(tmp, self.meta)
        for stale in self.folder.glob(".block-*.tmp"):  # StoreWriter's temp file of a block being written
            stale.unlink()
        return block_size

    def _read_meta(self) -> dict:
        try:
            return json.loads(self.meta.read_text())
        except (OSError, ValueError) as err:
            raise RuntimeError(f"{self.meta} is unreadable ({err}); pass --restart") from err

    def check(self, fingerprint: str) -> str | None:
        """What is wrong with the folder as another rank sees it (None: nothing)."""
        if not self.meta.is_file():
            return (f"{self.folder} (created by rank 0) is not visible here: STORE must be on a filesystem "
                    "that every node shares")
        if self._read_meta().get("fingerprint") != fingerprint:
            return f"{self.meta} does not match this rank's settings or image list"
        return None

    def done_blocks(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("block-*.tls"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class BatchResult:
    """One batch's output, handed from the inference loop to the writer thread. On CUDA the
    tensors are pinned host copies still in flight until ``ready`` completes."""

    block: int
    positions: np.ndarray  # image indices into the full list
    num_classes: int  # K of the model
    values: torch.Tensor  # [B, k, h, w] float16
    indices: torch.Tensor  # [B, k, h, w] int16 / int32
    pred: torch.Tensor  # [B, PRED_TOPK] image-level top classes
    finite: torch.Tensor  # [B] bool: every dense score finite
    ok: torch.Tensor  # [B] bool: the image decoded
    ready: "torch.cuda.Event | None" = None


class BlockWriter:
    """Writes blocks on a background thread as batches arrive: each block is streamed into its own
    :class:`StoreWriter` and closed (renamed into place) when its last image is in.

    :meth:`put` raises the writer's error, if it had one. :meth:`close` waits for every block;
    :meth:`abort` (after an error or interrupt in the loop) still finishes the blocks that are
    complete and discards the one in progress."""

    def __init__(self, partial: PartialResults, block_ranges: dict[int, tuple[int, int]], keys: Sequence[str],
                 paths: Sequence[str], fingerprint: str, *, topk: int, lossy: bool, model_name: str,
                 image_fingerprints: Sequence[tuple[int, int]] | None = None, max_pending: int = 8):
        self.partial, self.block_ranges, self.keys, self.paths = partial, block_ranges, keys, paths
        self.image_fingerprints = image_fingerprints
        self.fingerprint, self.model_name = fingerprint, model_name
        self.topk, self.lossy = topk, lossy
        self.error: BaseException | None = None
        self.busy_seconds = 0.0
        self.blocks_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._open: dict | None = None
        self._thread = threading.Thread(target=self._run, name="tl-fast-annotate-writer", daemon=True)
        self._thread.start()

    # -- main thread ----------------------------------------------------------------------------
    def put(self, item: BatchResult) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        self._stop()
        if self.error is not None:
            raise self.error
        if self._open is not None:  # pragma: no cover - the sampler always completes its blocks
            raise RuntimeError(f"block {self._open['block']} ended incomplete")

    def abort(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self.error is not None:
                    continue  # drain, so put() never blocks on a dead writer
                t0 = time.perf_counter()
                try:
                    self._add(item)
                except BaseException as err:  # surfaced in the main thread by put() / close()
                    self.error = err
                self.busy_seconds += time.perf_counter() - t0
        finally:
            if self._open is not None:
                self._open["writer"].abort()
                self._open = None

    def _add(self, item: BatchResult) -> None:
        if item.ready is not None:
            item.ready.synchronize()
        ok = item.ok.numpy()
        bad = ok & ~item.finite.numpy()
        if bad.any():
            names = ", ".join(self.paths[int(p)] for p in item.positions[bad][:3])
            raise RuntimeError(f"{self.model_name} produced NaN/inf scores for {names}")
        if self._open is None or self._open["block"] != item.block:
            if self._open is not None:  # pragma: no cover - batches arrive block by block
                raise RuntimeError(f"block {self._open['block']} ended incomplete")
            start, stop = self.block_ranges[item.block]
            self._open = {"block": item.block, "start": start, "count": stop - start, "seen": 0,
                          "pred": np.zeros((stop - start, PRED_TOPK), np.int64), "skipped": [],
                          "writer": StoreWriter(self.partial.block_path(item.block), num_classes=item.num_classes,
                                                topk=self.topk, map_size=tuple(item.values.shape[-2:]),
                                                lossy=self.lossy)}
        blk = self._open
        values, indices = item.values.numpy(), item.indices.numpy()
        writer = blk["writer"]
        for i, pos in enumerate(item.positions):
            local = int(pos) - blk["start"]
            if ok[i]:
                image_fp = None if self.image_fingerprints is None else self.image_fingerprints[int(pos)]
                writer.add(self.keys[int(pos)], values[i], indices[i], fingerprint=image_fp)
            else:
                blk["skipped"].append(local)
        blk["pred"][item.positions - blk["start"]] = item.pred.numpy()
        blk["seen"] += len(item.positions)
        if blk["seen"] == blk["count"]:
            writer.metadata[BLOCK_META] = {"index": blk["block"], "start": blk["start"], "count": blk["count"],
                                           "fingerprint": self.fingerprint, "pred": blk["pred"].reshape(-1).tolist(),
                                           "skipped": blk["skipped"]}
            self._open = None
            writer.close()
            self.blocks_written += 1


def read_block(partial: PartialResults, j: int, start: int, count: int, fingerprint: str,
               keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Check finished block ``j`` against the run and return its image-level predictions
    ``[count, PRED_TOPK]`` and skip flags ``[count]``."""
    path = partial.block_path(j)
    with LabelStore.open(path) as block:
        meta = block.metadata.get(BLOCK_META) or {}
        if (meta.get("fingerprint"), meta.get("start"), meta.get("count")) != (fingerprint, start, count):
            raise RuntimeError(f"{path} belongs to another run or block layout; pass --restart")
        skipped = np.zeros(count, bool)
        skipped[np.asarray(meta["skipped"], dtype=np.int64)] = True
        expected = [keys[start + i] for i in np.flatnonzero(~skipped)]
        if block.keys != expected:
            raise RuntimeError(f"{path} does not hold the records of images {start}..{start + count - 1}; "
                               "pass --restart")
        pred = np.asarray(meta["pred"], dtype=np.int64).reshape(count, PRED_TOPK)
    return pred, skipped
