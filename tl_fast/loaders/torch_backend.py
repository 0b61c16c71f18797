"""PyTorch backend: ``DataLoader`` workers decode with ``torchvision.io``, crop by the plan's pixel
box, resize to S (antialiased bilinear), flip, and return uint8 batches with their label maps.

A worker builds whole batches (the DataLoader's sampler hands it the plan's list of indices), so the
plan is computed once per batch, vectorized. A decode failure raises in the main process with the
image's path (the DataLoader re-raises worker exceptions); a stalled worker raises after
``timeout_s``.
"""
from __future__ import annotations

import gc
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
# Imported here, in the parent, rather than on first use: workers are forked every epoch, and an
# import in each of them cost more CPU than a batch.
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

from ..store import TopKMaps
from .batch import LoaderConfig
from .common import PlanMaker, StoreMaps


def decode_rgb(path: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` RGB of the image file at ``path`` (JPEG through libjpeg-turbo, others too)."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception as err:  # torchvision raises RuntimeError for bad data; say which file
        raise RuntimeError(f"cannot decode image {path}: {err}") from err


def crop_resize_flip(image: torch.Tensor, crop: Sequence[int], flip: bool, size: int) -> torch.Tensor:
    """``image[:, top:top+h, left:left+w]`` resized to ``size x size`` (bilinear, antialiased), flipped."""
    top, left, h, w = (int(v) for v in crop)
    out = TF.resize(image[:, top:top + h, left:left + w], [size, size],
                    interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return out.flip(-1) if flip else out


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """uint8 batch tensor; in a DataLoader worker, in shared memory from the start, so that sending
    it to the main process moves no bytes (as the default collate does for its stacked batches)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _worker_init(worker_id: int) -> None:
    """Leave the objects inherited from the parent out of this worker's garbage collections: they
    are long-lived, and traversing them costs time and copy-on-write page faults."""
    gc.freeze()


class _BatchDataset(Dataset):
    """Item ``i`` is the whole batch ``batches[i]``: ``(uint8 [B, 3, S, S], indices [B])``, plus the
    batch's top-k maps ``(values, indices)`` when ``labels`` reads them."""

    def __init__(self, paths: Sequence[str], batches: Sequence[np.ndarray], plan: PlanMaker, size: int,
                 labels: StoreMaps | None = None) -> None:
        self.paths = paths
        self.batches = batches
        self.plan = plan
        self.size = size
        self.labels = labels

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        idx = np.asarray(self.batches[i], dtype=np.int64)
        plan = self.plan(idx)
        out = _batch_buffer((len(idx), 3, self.size, self.size))
        for b, j in enumerate(idx):
            path = self.paths[j]
            image = decode_rgb(path)
            expected = tuple(int(v) for v in self.plan.sizes[j])
            if tuple(image.shape[1:]) != expected:
                raise RuntimeError(f"{path} decodes to {tuple(image.shape[1:])} but was indexed as {expected} "
                                   "(height, width): the file changed after indexing; delete the index cache")
            out[b] = crop_resize_flip(image, plan.crop[b], bool(plan.flip[b]), self.size)
        if self.labels is None:
            return out, torch.from_numpy(idx)
        maps = self.labels(idx)
        return out, torch.from_numpy(idx), maps.values, maps.indices


class TorchBackend:
    name = "torch"
    normalizes = False

    def __init__(self, paths: Sequence[str], sizes: np.ndarray, config: LoaderConfig, device: torch.device,
                 labels: StoreMaps | None = None) -> None:
        self.paths = list(paths)
        self.config = config
        self.device = device
        self.labels = labels
        if labels is not None and (labels.record >= 0).any():
            # Compile the record decoder here, once, rather than in every worker forked each epoch.
            labels(np.flatnonzero(labels.record >= 0)[:1])

    def iterate(self, batches: Sequence[np.ndarray], plan: PlanMaker) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        cfg = self.config
        workers = max(0, int(cfg.num_workers))
        loader = DataLoader(
            _BatchDataset(self.paths, list(batches), plan, cfg.image_size, self.labels), batch_size=None, shuffle=False,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            timeout=cfg.timeout_s if workers else 0, prefetch_factor=2 if workers else None,
            worker_init_fn=_worker_init if workers else None,
        )
        for images, idx, *maps in loader:
            yield images, idx.numpy(), {"maps": TopKMaps(*maps)} if maps else {}
