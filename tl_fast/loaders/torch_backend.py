"""PyTorch backend: ``DataLoader`` workers decode with ``torchvision.io``, crop by the plan's pixel
box, resize to S (antialiased bilinear), flip, and return uint8 batches with their label maps.

A worker builds whole batches (the DataLoader's sampler hands it the plan's list of indices), so the
plan is computed once per batch, vectorized, and it writes each batch's images and maps into one
shared-memory buffer, which reaches the main process as one file descriptor. A decode failure
raises in the main process with the image's path (the DataLoader re-raises worker exceptions); a
stalled worker raises after ``timeout_s``.
"""
from __future__ import annotations

import gc
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

from ..store import TopKMaps
from .batch import LoaderConfig
from .common import PlanMaker, StoreMaps


def decode_rgb(path: str) -> torch.Tensor:
    """uint8 ``[3, H, W]`` RGB of the image file at ``path`` (JPEG through libjpeg-turbo, others too):
    torchvision's decoder, or PIL's where torchvision has none."""
    try:
        if decode_image is None:
            return decode_rgb_pil(path)
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
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
    """One uint8 buffer for a whole batch (images and label maps). In a DataLoader worker it lives
    in shared memory from the start: sending it moves no bytes, and the batch travels as one file
    descriptor rather than one per tensor (each costs the receiver a socket connection: about 1 ms
    per tensor on the H100 machine's pin-memory thread)."""
    _, nbytes = _layout(parts)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


def _as_is(item):
    """The DataLoader's ``collate_fn`` without batching: items travel as built (the default would
    turn the index array into a tensor, sent through its own file descriptor)."""
    return item


def _worker_init(worker_id: int) -> None:
    """Leave the objects inherited from the parent out of this worker's garbage collections: they
    are long-lived, and traversing them costs time and copy-on-write page faults."""
    gc.freeze()


class _BatchDataset(Dataset):
    """Item ``i`` is the whole batch ``batches[i]``: ``(buffer, indices [B], parts)``, where the uint8
    ``buffer`` holds the images uint8 ``[B, 3, S, S]`` and, when ``labels`` reads them, the batch's
    top-k maps ``values`` and ``indices``, as laid out by ``parts`` (:func:`batch_views`)."""

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
        maps = self.labels(idx) if self.labels is not None else None
        parts = [((len(idx), 3, self.size, self.size), torch.uint8)]
        if maps is not None:
            parts += [(tuple(t.shape), t.dtype) for t in maps]
        buffer = _batch_buffer(parts)
        out, *map_views = batch_views(buffer, parts)
        for view, t in zip(map_views, maps if maps is not None else ()):
            view.copy_(t)
        for b, j in enumerate(idx):
            path = self.paths[j]
            image = decode_rgb(path)
            expected = tuple(int(v) for v in self.plan.sizes[j])
            if tuple(image.shape[1:]) != expected:
                raise RuntimeError(f"{path} decodes to {tuple(image.shape[1:])} but was indexed as {expected} "
                                   "(height, width): the file changed after indexing; delete the index cache")
            out[b] = crop_resize_flip(image, plan.crop[b], bool(plan.flip[b]), self.size)
        return buffer, idx, parts


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
            worker_init_fn=_worker_init if workers else None, collate_fn=_as_is,
        )
        for buffer, idx, parts in loader:
            images, *maps = batch_views(buffer, parts)
            yield images, np.asarray(idx), {"maps": TopKMaps(*maps)} if maps else {}
