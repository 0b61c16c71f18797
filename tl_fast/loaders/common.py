"""Pieces shared by the backends: the plan of every batch, the store reader and the backend interface."""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np
import torch

from ..dataset import ONE_HOT_SCORE
from ..plan import AugmentConfig, BatchPlan, EraseConfig, center_crop_plan, draw_mix_box, plan_batch, with_erase

if TYPE_CHECKING:
    from ..store import TopKMaps


@dataclass(frozen=True)
class PlanMaker:
    """Draws the whole plan of a batch of sample indices for one epoch: the only caller of the
    drawing primitives in :mod:`tl_fast.plan`, so a batch's plan is drawn in one place, once.

    Training (``augment`` given) uses :func:`tl_fast.plan.plan_batch`; otherwise the evaluation
    centre crop :func:`tl_fast.plan.center_crop_plan`. ``erase`` adds random-erasing boxes for
    output images of ``image_size``; ``mix`` (``"batch"`` or ``"sample"``) a MixToken box on the
    token ``grid``, keyed by the step or by sample index."""

    seed: int
    epoch: int
    sizes: np.ndarray  # [N, 2] (height, width) of every sample's source image
    augment: AugmentConfig | None
    crop_pct: float = 0.875
    erase: EraseConfig | None = None
    image_size: int = 0
    mix: str | None = None
    grid: tuple[int, int] = (14, 14)

    def __call__(self, indices: np.ndarray, step: int = 0) -> BatchPlan:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        sizes = self.sizes[indices]
        if self.augment is None:
            plan = replace(center_crop_plan(indices, sizes, self.crop_pct), epoch=self.epoch)
        else:
            plan = plan_batch(self.seed, self.epoch, indices, sizes, self.augment)
        if self.erase is not None and self.erase.prob > 0:
            plan = with_erase(plan, self.seed, (self.image_size, self.image_size), self.erase)
        mix = None
        if self.mix == "sample":
            mix = draw_mix_box(self.seed, self.epoch, indices, self.grid)
        elif self.mix == "batch":
            mix = draw_mix_box(self.seed, self.epoch, [step], self.grid)
        return replace(plan, mix=mix, step=int(step))


class EpochPlans(Sequence[BatchPlan]):
    """The plans of one epoch's batches ``batches`` (this rank's, the first at step ``start``): item
    ``i`` is drawn when a backend or the loader first asks for it, from whichever thread, and the
    same object is returned until the loader, done with the batch, calls :meth:`release`. So the
    image side and the label side read one plan, drawn once, and only the batches in flight are held."""

    def __init__(self, maker: PlanMaker, batches: Sequence[np.ndarray], start: int = 0) -> None:
        self.maker = maker
        self.batches = [np.asarray(b, dtype=np.int64) for b in batches]
        self.start = int(start)
        self._plans: dict[int, BatchPlan] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> BatchPlan:
        if not 0 <= i < len(self.batches):
            raise IndexError(f"batch {i} of an epoch plan with {len(self.batches)} batches")
        with self._lock:
            plan = self._plans.get(i)
            if plan is None:
                plan = self._plans[i] = self.maker(self.batches[i], self.start + i)
            return plan

    def __iter__(self) -> Iterator[BatchPlan]:
        return (self[i] for i in range(len(self.batches)))

    def release(self, i: int) -> None:
        """The loader has delivered batch ``i``: its plan need not be held any more."""
        with self._lock:
            self._plans.pop(i, None)


def map_parts(batch: int, num_classes: int, topk: int,
              map_size: Sequence[int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of the values and indices of ``batch`` decoded top-k maps."""
    shape = (batch, topk, *map_size)
    return [(shape, torch.float16), (shape, torch.int16 if num_classes <= 32767 else torch.int32)]


def empty_maps(parts: Sequence[tuple[tuple[int, ...], torch.dtype]], pin: bool) -> TopKMaps:
    """Uninitialized maps of ``parts`` to decode a batch into: pinned when the batch goes to a GPU,
    so the decode lands where the asynchronous copy to the device reads, without a staging copy."""
    from ..store import TopKMaps

    return TopKMaps(*(torch.empty(shape, dtype=dtype, pin_memory=pin) for shape, dtype in parts))


class StoreMaps:
    """The top-k maps of a batch of sample indices, read from a label store: ``record[i]`` is sample
    i's record (-1: none, then the one-hot fall-back of its class ``targets[i]``).

    Picklable (the store pickles by path), so a backend can call it in its worker processes."""

    def __init__(self, store, record: np.ndarray, targets: np.ndarray) -> None:
        self.store = store
        self.record = np.asarray(record, dtype=np.int64)
        self.targets = np.asarray(targets)
        self.index_dtype = torch.int16 if store.num_classes <= 32767 else torch.int32

    def parts(self, batch: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of the values and indices of ``batch`` samples' maps."""
        return map_parts(batch, self.store.num_classes, self.store.topk, self.store.map_size)

    def __call__(self, idx: np.ndarray, out: TopKMaps | None = None) -> TopKMaps:
        """The maps of samples ``idx``, decoded into ``out`` (a ``TopKMaps`` of :meth:`parts`'
        shapes, e.g. views of a batch buffer) or into new tensors."""
        self.store.check_unchanged()  # one stat per batch: a shrunken map is an error, not SIGBUS
        idx = np.asarray(idx, dtype=np.int64)
        rec = self.record[idx]
        missing = rec < 0
        if not missing.any():
            return self.store.read(rec, out=out)
        if out is None:
            out = empty_maps(self.parts(len(idx)), pin=False)
        # The one-hot fall-back: every position scores ONE_HOT_SCORE for the image's class, the other
        # top-k slots repeat the class with score 0; then the records that exist.
        out.values.zero_()
        out.values[:, 0] = ONE_HOT_SCORE
        out.indices.copy_(torch.as_tensor(self.targets[idx]).to(self.index_dtype).view(-1, 1, 1, 1)
                          .expand(out.indices.shape))
        if missing.all():
            return out
        read = self.store.read(rec[~missing])
        keep = torch.from_numpy(np.flatnonzero(~missing))
        out.values[keep], out.indices[keep] = read.values, read.indices
        return out


class Backend(Protocol):
    name: str
    normalizes: bool  # whether images come out normalized (then no device pixel ops run)

    def iterate(self, plans: EpochPlans) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        """Yield the batches of ``plans`` in order (``plans.batches[i]`` are batch i's sample indices),
        each cropped and flipped by its plan, as ``(uint8 images, indices, extras)``; with token
        labels, ``extras["maps"]`` holds the batch's top-k maps, decoded where the images are made
        (and ``extras["label_s"]`` the host seconds it took, where that is the main process)."""
        ...

