"""The images an annotator sees: the folder listing (from :class:`tl_fast.dataset.ImageFolderIndex`),
whole images resized to the model's input, and batches that never straddle a block.

Images are resized whole (no crop, aspect ratio not kept) to ``size`` x ``size`` so that map cell
``(y, x)`` covers the same normalized region of the source image at any image size, which is what
the token-label ops assume.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..dataset import ImageFolderIndex

log = logging.getLogger(__name__)

PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                     "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


@dataclass
class ImageList:
    """Images of an ImageFolder-layout root: classes sorted by name, files sorted within each class.

    ``skipped`` lists files the index left out (unreadable header, truncated JPEG) with the reason."""

    root: Path
    classes: list[str]
    paths: list[str]  # relative, '/'-separated
    labels: list[int]
    keys: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # per image (size in bytes, content hash): recorded in the store, checked when loaders join
    fingerprints: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def list_images(root: str | os.PathLike, *, progress: bool = False, quiet: bool = False) -> ImageList:
    """List ``root/<class>/**/<image>`` through :class:`tl_fast.dataset.ImageFolderIndex` (the same
    listing, skip policy and header cache as the loaders), and refuse two images with one store key.

    ``quiet`` silences the index's warning about skipped files (ranks other than 0 list the same
    folder)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        index = ImageFolderIndex(root, progress=progress)
    keys = list(index.keys)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"two images under {index.root} share the store key {dup!r} (same name, different "
                         "extension); rename one")
    fingerprints = [(int(n), int(h)) for n, h in zip(index.byte_sizes, index.fingerprints)]
    return ImageList(Path(index.root), list(index.classes), list(index.paths), [int(t) for t in index.targets],
                     keys, [(s.path, s.reason) for s in index.skipped], fingerprints)


class ResizedImages(torch.utils.data.Dataset):
    """Whole images resized to ``size`` x ``size``, as ``(uint8 [3, S, S], index, ok)``; normalized
    on the device. An image that fails to decode is a counted skip (docs/spec.md section 6): zeros and
    ``ok=False``."""

    def __init__(self, root: Path, paths: Sequence[str], size: int, interpolation: str):
        self.root, self.paths, self.size = Path(root), list(paths), int(size)
        self.interpolation = PIL_INTERPOLATION[interpolation]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as im:
                im.draft("RGB", (self.size, self.size))  # JPEG: let libjpeg decode at a reduced scale
                arr = np.array(im.convert("RGB").resize((self.size, self.size), self.interpolation))
            return torch.from_numpy(arr).permute(2, 0, 1), i, True
        except Exception as err:  # corrupt / truncated / unreadable
            log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return torch.zeros((3, self.size, self.size), dtype=torch.uint8), i, False


class BlockBatches(torch.utils.data.Sampler):
    """Batches of image indices, block by block: block ``j`` covers images ``[j * block, (j+1) * block)``
    and is cut into batches from its own start, so a batch holds the same images whichever rank runs
    it (which is what makes the records independent of the world size)."""

    def __init__(self, blocks: Sequence[int], block_size: int, num_images: int, batch_size: int):
        self.blocks, self.block_size = list(blocks), int(block_size)
        self.num_images, self.batch_size = int(num_images), int(batch_size)

    def block_range(self, j: int) -> tuple[int, int]:
        return j * self.block_size, min(self.num_images, (j + 1) * self.block_size)

    def __iter__(self) -> Iterator[list[int]]:
        for j in self.blocks:
            start, stop = self.block_range(j)
            for s in range(start, stop, self.batch_size):
                yield list(range(s, min(stop, s + self.batch_size)))

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for a, b in map(self.block_range, self.blocks))
