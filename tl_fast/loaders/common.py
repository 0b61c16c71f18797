"""Pieces shared by the backends: the per-epoch plan maker, the store reader and the backend interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

from ..dataset import ONE_HOT_SCORE
from ..plan import AugmentConfig, BatchPlan, center_crop_plan, plan_batch


@dataclass(frozen=True)
class PlanMaker:
    """The plan of any batch of sample indices for one epoch (picklable, so workers can hold it).

    Training (``augment`` given) uses :func:`tl_fast.plan.plan_batch`; otherwise the evaluation
    centre crop :func:`tl_fast.plan.center_crop_plan`."""

    seed: int
    epoch: int
    sizes: np.ndarray  # [N, 2] (height, width) of every sample's source image
    augment: AugmentConfig | None
    crop_pct: float = 0.875

    def __call__(self, indices: np.ndarray) -> BatchPlan:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        sizes = self.sizes[indices]
        if self.augment is None:
            return center_crop_plan(indices, sizes, self.crop_pct)
        return plan_batch(self.seed, self.epoch, indices, sizes, self.augment)



def one_hot_maps(classes: np.ndarray, topk: int, map_size: tuple[int, int], index_dtype: torch.dtype):
    """Maps whose every position scores ``ONE_HOT_SCORE`` for the image's class (the fall-back for
    images without a record); the other top-k slots repeat the class with score 0."""
    from ..store import TopKMaps

    b = len(classes)
    h, w = map_size
    values = torch.zeros((b, topk, h, w), dtype=torch.float16)
    values[:, 0] = ONE_HOT_SCORE
    indices = torch.as_tensor(np.asarray(classes)).to(index_dtype).view(b, 1, 1, 1).expand(b, topk, h, w).contiguous()
    return TopKMaps(values, indices)


class StoreMaps:
    """The top-k maps of a batch of sample indices, read from a label store: ``record[i]`` is sample
    i's record (-1: none, then the one-hot fall-back of its class ``targets[i]``).

    Picklable (the store pickles by path), so a backend can call it in its worker processes."""

    def __init__(self, store, record: np.ndarray, targets: np.ndarray) -> None:
        self.store = store
        self.record = np.asarray(record, dtype=np.int64)
        self.targets = np.asarray(targets)
        self.index_dtype = torch.int16 if store.num_classes <= 32767 else torch.int32

    def __call__(self, idx: np.ndarray):
        from ..store import TopKMaps

        self.store.check_unchanged()  # one stat per batch: a shrunken map is an error, not SIGBUS
        rec = self.record[np.asarray(idx, dtype=np.int64)]
        missing = rec < 0
        if not missing.any():
            return self.store.read(rec)
        fallback = one_hot_maps(self.targets[idx], self.store.topk, self.store.map_size, self.index_dtype)
        if missing.all():
            return fallback
        read = self.store.read(rec[~missing])
        keep = torch.from_numpy(np.flatnonzero(~missing))
        values, indices = fallback.values.clone(), fallback.indices.clone().to(read.indices.dtype)
        values[keep], indices[keep] = read.values, read.indices
        return TopKMaps(values, indices)


class Backend(Protocol):
    name: str
    normalizes: bool  # whether images come out normalized (then no device pixel ops run)

    def iterate(self, batches: Sequence[np.ndarray], plan: PlanMaker) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        """Yield the batches ``batches`` (lists of sample indices) in order, cropped by ``plan``."""
        ...

