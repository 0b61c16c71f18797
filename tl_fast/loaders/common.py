"""Pieces shared by the backends: the per-epoch plan maker and the backend interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch

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



class Backend(Protocol):
    name: str
    normalizes: bool  # whether images come out normalized (then no device pixel ops run)

    def iterate(self, batches: Sequence[np.ndarray], plan: PlanMaker) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        """Yield the batches ``batches`` (lists of sample indices) in order, cropped by ``plan``."""
        ...

