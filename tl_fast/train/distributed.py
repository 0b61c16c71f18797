"""Process-group setup from the environment ``torchrun`` provides (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class RankRole:
    """``distributed`` and ``is_main`` for a class with ``rank`` and ``world_size``."""

    rank: int
    world_size: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class DistInfo(RankRole):
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def setup_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialize ``torch.distributed`` when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else a
    single process. ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). On CUDA
    each process takes GPU ``LOCAL_RANK`` and the NCCL backend; on CPU, gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None)
    return DistInfo(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(obj):
    """``[obj from rank 0, obj from rank 1, ...]`` (``[obj]`` when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts buffers before each forward, so after the last step the ranks' statistics differ
    by one local update; call this before evaluating or saving so every rank holds the same model."""
    if dist.is_available() and dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src)
