"""Ranks for ``tl-fast annotate`` under ``torchrun``: the process group torchrun's environment
describes (NCCL on GPU, gloo on CPU), a gloo group for the small control messages, and one
progress bar on rank 0 that counts every rank's images.

Annotation exchanges no tensors between ranks, only a few objects (fingerprints, the list of
finished blocks, the result) and progress counts. Those go over a gloo group on the CPU with a long
timeout: ranks wait there for rank 0 to assemble the store, which takes minutes at ImageNet scale.
"""
from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..train.distributed import RankRole, setup_distributed

CONTROL_TIMEOUT = timedelta(hours=2)


@dataclass
class Ranks(RankRole):
    rank: int
    world_size: int
    device: torch.device
    group: Any = None  # gloo control group (None in one process)
    owns_process_group: bool = False

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, problem: str | None) -> None:
        """Raise the first rank's problem on every rank (so no rank is left waiting in a collective)."""
        problems = self.gather(problem)
        for r, p in enumerate(problems):
            if p is not None:
                raise RuntimeError(p if not self.distributed else f"rank {r}: {p}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self.distributed:
            dist.destroy_process_group(self.group)
            if self.owns_process_group:
                dist.destroy_process_group()


def setup_ranks(device: str | torch.device | None) -> Ranks:
    """Join the process group torchrun set up (or initialize it from its environment); one process
    without ``WORLD_SIZE`` > 1. Under torchrun, rank ``r`` takes GPU ``LOCAL_RANK`` on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized and world <= 1:
        dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return Ranks(0, 1, dev)
    info = setup_distributed(None if device is None else str(device))
    owns = not initialized
    if dist.get_world_size() == 1:
        return Ranks(0, 1, info.device, owns_process_group=owns)
    group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size(), info.device, group, owns)


class GlobalProgress:
    """One tqdm bar on rank 0 with the global image count and ETA; other ranks draw nothing.

    Every ``every`` batches each rank adds its count into an asynchronous all-reduce on the control
    group and reads the sum of an earlier one, so the loop never waits on it unless a rank falls
    ``lag * every`` batches behind. Every rank issues the same number of reductions: the ones with
    fewer batches issue the rest after their loop."""

    def __init__(self, ranks: Ranks, total: int, initial: int, batches_per_rank: Sequence[int], *,
                 enabled: bool, every: int = 4, lag: int = 2, desc: str = "annotate"):
        from tqdm.auto import tqdm

        self.ranks, self.every, self.lag = ranks, int(every), int(lag)
        self.rounds = math.ceil(max(batches_per_rank, default=0) / self.every) if ranks.distributed else 0
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="img", smoothing=0.05,
                        disable=not (enabled and ranks.is_main))
        self._issued = 0
        self._shown = 0  # images of this run counted on the bar (all ranks)
        self._pending: deque = deque()

    def step(self, batches: int, images: int, batch_images: int) -> None:
        """After this rank's ``batches``-th batch, with ``images`` done by it in this run."""
        if not self.ranks.distributed:
            self.bar.update(batch_images)
        elif batches % self.every == 0:
            self._reduce(images)

    def finish(self, images: int) -> None:
        while self._issued < self.rounds:
            self._reduce(images)
        while self._pending:
            self._collect()
        self.bar.close()

    def close(self) -> None:
        self.bar.close()

    def _reduce(self, images: int) -> None:
        count = torch.tensor([images], dtype=torch.int64)
        work = dist.all_reduce(count, group=self.ranks.group, async_op=True)
        self._pending.append((work, count))
        self._issued += 1
        while len(self._pending) > self.lag:
            self._collect()

    def _collect(self) -> None:
        work, count = self._pending.popleft()
        work.wait()
        total = int(count[0])
        self.bar.update(total - self._shown)
        self._shown = total
