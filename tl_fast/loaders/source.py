"""Where a loader's samples come from: an image folder with a label store joined to it, or a packed file.

A source knows its samples (original image sizes, class ids, which samples are usable and which
were skipped), how their token labels are found (a store's records joined to the images by key, or
records packed beside the images) and which backends read it, and builds the backend. The loader
asks it for those and does not branch on the kind of source or the backend.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..dataset import ImageFolderIndex, SkippedImage, check_store_classes, join_labels
from .batch import LoaderConfig
from .common import Backend, StoreMaps


def _open_store(labels, access: str):
    from ..store import LabelStore

    if isinstance(labels, (str, os.PathLike)):
        return LabelStore.open(labels, access=access)
    return labels


class ImageFolderSource:
    """An ImageFolder directory (``root/<class>/<image>``), read by the DALI or torch backend, and a
    label store (path or open ``LabelStore``) joined to its images by key, or none (plain labels).

    ``bad_images``, ``missing_labels``, ``mismatched_images``: as :class:`LoaderConfig`'s."""

    backends = ("dali", "torch")

    def __init__(self, images: str | os.PathLike, labels=None, *, bad_images: str = "skip",
                 missing_labels: str = "error", mismatched_images: str = "error") -> None:
        if not os.path.isdir(images):
            raise ValueError(f"{images} is not an ImageFolder directory")
        self.path = str(images)
        self.index = ImageFolderIndex(images, bad_images=bad_images)
        self.skipped: list[SkippedImage] = self.index.skipped
        self.num_skipped = len(self.skipped)
        self.classes = self.index.classes
        self.sizes, self.targets = self.index.sizes, self.index.targets
        self.ids = np.arange(len(self.index), dtype=np.int64)
        self.num_classes = self.index.num_classes
        self.num_missing_labels = 0
        self.map_geometry: tuple | None = None  # (K, k, (H, W)) of the token labels, None without
        self.store_maps: StoreMaps | None = None  # reads a batch's maps from the store
        if labels is not None:
            # Batches gather scattered records: map them in at open, or read only the pages asked
            # for when the store is too big to stay cached (tl_fast.store.reader).
            store = _open_store(labels, "auto")
            join = join_labels(self.index, store, missing_labels=missing_labels, mismatched_images=mismatched_images)
            self.store_maps = StoreMaps(store, join.record, self.targets)
            self.num_missing_labels = join.num_missing
            self.num_classes = store.num_classes
            self.map_geometry = (store.num_classes, store.topk, store.map_size)

    def check_unchanged(self) -> None:
        """Raise if the label store changed since it was opened."""
        if self.store_maps is not None:
            self.store_maps.store.check_unchanged()

    def backend(self, name: str, config: LoaderConfig, device: torch.device, *, token_labels: bool) -> Backend:
        """The ``name`` backend over these images; it reads the maps too when ``token_labels``."""
        paths = [self.index.abspath(i) for i in range(len(self.index))]
        labels = self.store_maps if token_labels else None
        if name == "torch":
            from .torch_backend import TorchBackend

            # Token labels are read in the DataLoader workers, beside the images: the main process,
            # which also drives the GPU, only copies them to the device.
            return TorchBackend(paths, self.sizes, config, device, labels=labels)
        if name == "dali":
            from .dali_backend import DALIBackend

            return DALIBackend(paths, self.sizes, config, device, normalize=not config.device_pixel_ops, labels=labels)
        raise ValueError(f"backend {name!r} reads a .beton, not an ImageFolder directory ({self.path})")


class PackedSource:
    """A ``.beton`` written by ``tl-fast pack-ffcv`` (images, class ids and, unless packed with
    ``--no-labels``, label records), read by the FFCV backend.

    ``labels``: the store it was packed from, or None; given, its label geometry must be the packed
    one. ``token_labels``: whether the loader wants token labels from it (an error if it has none)."""

    backends = ("ffcv",)

    def __init__(self, path: str | os.PathLike, labels=None, *, token_labels: bool = True) -> None:
        from .ffcv import read_packed

        self.path = str(path)
        self.info = packed = read_packed(path)
        self.classes = packed.classes
        self.sizes, self.targets, self.ids = packed.sizes, packed.targets, packed.valid_ids
        self.skipped = [SkippedImage(p, reason) for p, reason in packed.skipped]
        self.num_skipped = max(len(self.skipped), packed.num_invalid)
        if self.skipped:
            listing = "; ".join(f"{s.path}: {s.reason}" for s in self.skipped[:5])
            warnings.warn(f"{path}: {len(self.skipped)} image(s) were skipped when it was packed: {listing}"
                          + (f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""), stacklevel=4)
        self.map_geometry = (packed.num_classes, packed.topk, packed.map_size) if packed.has_records else None
        self.num_classes = packed.num_classes
        self.num_missing_labels = packed.num_one_hot
        if not packed.has_records:
            if labels is not None and token_labels:
                raise ValueError(
                    f"{path} was packed without label records (pack-ffcv --no-labels), so it cannot give token "
                    f"labels: repack it with the store (tl-fast pack-ffcv IMAGES STORE OUT.beton), or load it "
                    "without token labels (labels=None, token_labels=False or train=False)")
        elif labels is not None:
            store = _open_store(labels, "normal")  # only its header is compared: map nothing in
            if (store.num_classes, store.topk, store.map_size) != self.map_geometry:
                raise ValueError(f"{path} packs labels with (K, k, map) = {self.map_geometry} but the store "
                                 f"{labels} has {(store.num_classes, store.topk, store.map_size)}: "
                                 "repack with this store")
            check_store_classes(store, self.classes, self.path)

    def check_unchanged(self) -> None:
        """Nothing beside the ``.beton`` is mapped (the backend checks the file itself)."""

    def backend(self, name: str, config: LoaderConfig, device: torch.device, *, token_labels: bool) -> Backend:
        """The FFCV backend over this file; it decodes the packed records too when ``token_labels``."""
        if name != "ffcv":
            raise ValueError(f"backend {name!r} reads an ImageFolder directory; {self.path} is not one")
        from .ffcv import FFCVBackend

        return FFCVBackend(self.path, config, device, with_records=token_labels and self.map_geometry is not None,
                           info=self.info)


def open_source(images, labels, backend: str, config: LoaderConfig) -> ImageFolderSource | PackedSource:
    """The source a loader with ``backend`` reads at ``images`` (a directory, or a ``.beton`` for
    ``"ffcv"``), with the label store ``labels``; ``images`` may also be a source already built."""
    if isinstance(images, (ImageFolderSource, PackedSource)):
        if labels is not None:
            raise ValueError("give the label store to the source, not to the loader, when images is a source")
        return images
    if backend == "ffcv":
        return PackedSource(images, labels, token_labels=config.train and config.token_labels)
    if not os.path.isdir(images):
        raise ValueError(f"backend {backend!r} reads an ImageFolder directory; {images} is not one")
    return ImageFolderSource(images, labels, bad_images=config.bad_images, missing_labels=config.missing_labels,
                             mismatched_images=config.mismatched_images)
