"""FFCV's loader and epoch iterator, guarded: pipeline errors surface, stalls time out.

A failing pipeline thread would leave FFCV's iterator waiting forever; :class:`_GuardedEpochIterator`
forwards the exception to the consumer (naming the batch's images), and raises ``TimeoutError``
when no batch arrives within the loader's ``timeout_s``. The pipeline thread compiles its code on
the first batch: ``__iter__`` waits for that batch, so numba compilation (which parses source with
``ast``) never overlaps work in the calling thread — on CPython 3.11 two threads using ``ast`` at
once can fail with ``SystemError: AST constructor recursion depth mismatch``.

A loader may set ``before_batch(b_ix, sample_ids)``: called on the pipeline thread just before
batch ``b_ix`` of the epoch is decoded (the backend writes the batch's plan there).

The loader reads the file through tl_fast's own memory manager (:mod:`.memory`), set on this loader
alone: FFCV's classes are not changed, so plain FFCV loaders in the process are not affected.
"""
from __future__ import annotations

import threading
import time
from queue import Empty
from typing import Sequence

import numpy as np
import torch
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.memory_managers import OSCacheManager
from ffcv.pipeline.compiler import Compiler

from .memory import CheckedOSCacheManager


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
            before = getattr(self.loader, "before_batch", None)
            if before is not None:
                before(b_ix, batch_indices)
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

    @property
    def memory_manager(self) -> CheckedOSCacheManager:
        return self._memory_manager

    @memory_manager.setter
    def memory_manager(self, manager) -> None:
        # FFCV's Loader.__init__ assigns its OS-cache manager here and compiles the memory read from
        # this attribute right after: this loader takes tl_fast's subclass instead (FFCV unchanged).
        if not isinstance(manager, OSCacheManager):
            raise ValueError("tl_fast's FFCV loader reads through the OS cache: build it with os_cache=True "
                             "(unset FFCV_DEFAULT_CACHE_PROCESS)")
        self._memory_manager = (manager if isinstance(manager, CheckedOSCacheManager)
                                else CheckedOSCacheManager.adopt(manager))

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
