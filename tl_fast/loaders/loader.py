"""``TokenLabelLoader``: one loader, three image backends (DALI, FFCV, torch), one geometry plan.

The loader owns everything that must agree across backends: the epoch's sample order (a
counter-based permutation keyed by ``(seed, epoch)``), sharding by rank, the plan of every batch,
the label side (store records by sample index, or records packed beside the images) and the device
step (:mod:`tl_fast.augment`). Each batch's plan — crop, flip, RandAugment, erasing boxes and noise
seed, MixToken box — is one frozen :class:`tl_fast.plan.BatchPlan`, drawn once (:class:`EpochPlans`)
and handed to the backend, which only turns it into cropped, resized, flipped uint8 images and
reports which indices it delivered; the device step and the labels read the same object, and it
travels on the :class:`Batch`.

Resuming: ``state_dict()`` holds ``(epoch, step)``; every random draw is keyed by sample index,
epoch and step, so the batches after a resume are the ones an uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch

from .. import rng
from ..augment import augment_batch
from ..classes import match_classes, same_classes
from ..dataset import ImageFolderIndex
from ..plan import AugmentConfig, BatchPlan
from .batch import Batch, LoaderConfig
from .common import EpochPlans, PlanMaker
from .source import ImageFolderSource, PackedSource, open_source

BACKENDS = ("dali", "ffcv", "torch")
log = logging.getLogger(__name__)


def resolve_backend(backend: str, images) -> str:
    """``"auto"``: FFCV for a packed file (or source), else DALI when it imports, else torch; others
    as given."""
    if backend == "auto":
        from ..optional import available

        packed = isinstance(images, PackedSource)
        if packed or (not isinstance(images, ImageFolderSource) and os.path.isfile(images)):
            backend = "ffcv"
        else:
            backend = "dali" if available("nvidia.dali") else "torch"
        log.info("TokenLabelLoader: backend='auto' chose %r for %s", backend, getattr(images, "path", images))
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        r, w = int(rank), int(world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r = torch.distributed.get_rank() if rank is None else int(rank)
        w = torch.distributed.get_world_size() if world_size is None else int(world_size)
    else:
        r, w = int(rank or 0), int(world_size or 1)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is not in [0, world_size={w})")
    return r, w


def epoch_order(seed: int, epoch: int, ids: np.ndarray, shuffle: bool) -> np.ndarray:
    """The epoch's sample order: ``ids`` sorted by a hash of ``(seed, epoch, id)`` (or as given)."""
    ids = np.asarray(ids, dtype=np.int64)
    if not shuffle:
        return ids
    return ids[np.argsort(rng.hash_keys(seed, epoch, ids, rng.Stream.SHUFFLE), kind="stable")]


class TokenLabelLoader:
    """Batches for token-labeling training (or evaluation) from an image folder (or packed file).

    Args:
        images: ImageFolder-layout directory (``root/<class>/<image>``); for ``backend="ffcv"`` the
            ``.beton`` written by ``tl-fast pack-ffcv`` (labels packed inside, or none with
            ``--no-labels``: then only without token labels); or a source already built
            (:class:`tl_fast.loaders.source.ImageFolderSource`, ``PackedSource``), labels inside it.
        labels: a label store path (opened with ``access="auto"``) or an open ``LabelStore`` (used as
            opened); None for plain labels / evaluation.
        backend: ``"dali"``, ``"ffcv"``, ``"torch"`` or ``"auto"`` (the default: ``"ffcv"`` for a
            packed file, else DALI when it is installed, else torch; the choice is logged).
        batch_size, image_size, patch_size: batch and network input geometry (grid = S / patch).
        augment: training augmentation (``AugmentConfig()``: timm's recipe); None: centre crop.
        mixtoken, mixtoken_per_sample: draw a MixToken box per batch (or per sample); ``None``
            (default): drawn for ``label_mode="tokens"``, not for ``"class"``.
        smoothing: label smoothing applied to the token targets.
        device: where images, labels and maps are delivered.
        seed: keys every random draw (with epoch and sample index).
        train: False gives the evaluation centre crop, no erasing, no MixToken, no maps.
        drop_last: drop the last incomplete batch (default: True when training).
        num_workers: decoding workers / threads of the backend.
        channels_last: deliver images in channels_last memory format.
        rank, world_size: shard (default: from ``torch.distributed`` when initialized).
        classes: the class list to deliver ids of (e.g. the train split's, for a val loader): the
            source's classes are matched to it by name, a class it lacks is an error
            (:class:`tl_fast.classes.ClassMismatch`), and classes of the list the source has no
            images of are warned about (``lacking_classes``). A loader that delivers label maps
            must have exactly these classes (the maps' ids are the store's). None: the source's own.
        **options: further :class:`LoaderConfig` fields (``missing_labels``, ``bad_images``,
            ``mismatched_images``, ``erase``, ``crop_pct``, ``timeout_s``, ``token_labels``, ``label_mode``:
            ``"class"`` delivers the maps for a classifier without token outputs, whose
            ``batch.loss(logits)`` uses the class-token target only; ``label_compat="official"``: the
            official code's label region and smoothing, :mod:`tl_fast.compat`).
    """

    def __init__(
        self, images: str | os.PathLike | ImageFolderSource | PackedSource, labels=None, *, backend: str = "auto",
        batch_size: int, image_size: int = 224, patch_size: int = 16, augment: AugmentConfig | None = AugmentConfig(),
        mixtoken: bool | None = None, mixtoken_per_sample: bool = False, smoothing: float = 0.1,
        device: str | torch.device | None = None, seed: int = 0, train: bool = True, drop_last: bool | None = None,
        num_workers: int = 4, channels_last: bool = False, rank: int | None = None, world_size: int | None = None,
        classes: Sequence[str] | None = None, **options,
    ) -> None:
        backend = resolve_backend(backend, images)
        self.backend_name = backend
        self.config = LoaderConfig(
            batch_size=batch_size, image_size=image_size, patch_size=patch_size, augment=augment, mixtoken=mixtoken,
            mixtoken_per_sample=mixtoken_per_sample, smoothing=smoothing, seed=seed, train=train,
            drop_last=train if drop_last is None else drop_last, num_workers=num_workers, channels_last=channels_last,
            **options)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self._epoch = 0
        self._step = 0
        # Host seconds spent on the label side (record read/decode, copy) and batches delivered: what
        # token labels add to a batch (benchmarks/loader_throughput.py reports it).
        self.stats = {"label_s": 0.0, "batches": 0}
        self.source = source = open_source(images, labels, backend, self.config)
        self.classes, self.num_classes = source.classes, source.num_classes
        self._sizes, self._targets, self._ids = source.sizes, source.targets, source.ids
        self.skipped, self.num_skipped = source.skipped, source.num_skipped
        self.num_missing_labels = source.num_missing_labels
        self._map_geometry = source.map_geometry
        self.lacking_classes: list[str] = []
        if classes is not None:
            self._use_classes(list(classes))
        self._backend = source.backend(backend, self.config, self.device, token_labels=self.has_token_labels)
        if len(self) == 0:
            warnings.warn(f"loader has no batches: {len(self._ids)} samples, batch_size {batch_size}, "
                          f"world_size {self.world_size}, drop_last {self.config.drop_last}", stacklevel=2)

    def _use_classes(self, classes: list[str]) -> None:
        """Deliver ids of ``classes`` (the ``classes`` argument), matched by name to the source's."""
        where = getattr(self.source, "path", "the images")
        if self.has_token_labels:
            same_classes(self.classes, classes, what=where, reference_what="the class list given",
                         remedy="label maps keep the store's ids, so a loader with token labels needs exactly these "
                         "classes (annotate the images of these classes)")
            return
        ids, self.lacking_classes = match_classes(self.classes, classes, what=where,
                                                  reference_what="the class list given")
        self._targets = ids[self._targets]
        self.classes, self.num_classes = classes, len(classes)
        if self.lacking_classes:
            warnings.warn(f"{where} has no images of {len(self.lacking_classes)} of the {len(classes)} classes "
                          f"({', '.join(self.lacking_classes[:5])}{', ...' if len(self.lacking_classes) > 5 else ''}); "
                          "its class ids are those of the class list given, matched by name", stacklevel=3)

    @property
    def index(self) -> ImageFolderIndex:
        """The image folder's index (a loader over an image folder only)."""
        return self.source.index

    # -- public API ------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def num_samples(self) -> int:
        """Usable samples in the whole dataset (all ranks)."""
        return len(self._ids)

    @property
    def has_token_labels(self) -> bool:
        return self.config.train and self.config.token_labels and self._map_geometry is not None

    def __len__(self) -> int:
        return self._num_batches()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch restarts at its first batch, the current one keeps its
        position (so ``load_state_dict`` then ``set_epoch`` of the same epoch resumes mid-epoch)."""
        if int(epoch) != self._epoch:
            self._epoch = int(epoch)
            self._step = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "step": self._step, "seed": self.config.seed, "batch_size": self.config.batch_size,
                "world_size": self.world_size, "rank": self.rank, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "world_size", "num_samples"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: the saved loader had {key}={state[key]}, this one has {mine}")
        self._epoch = int(state["epoch"])
        self._step = int(state["step"])

    # -- epoch layout ----------------------------------------------------------------------------
    def _num_batches(self) -> int:
        cfg = self.config
        n = len(self._ids)
        if self.world_size > 1:
            n = n // self.world_size if cfg.drop_last else len(range(self.rank, n, self.world_size))
        return n // cfg.batch_size if cfg.drop_last else -(-n // cfg.batch_size)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        cfg = self.config
        order = epoch_order(cfg.seed, epoch, self._ids, shuffle=cfg.augmenting)
        if self.world_size > 1:
            shard = order[self.rank::self.world_size]
            if cfg.drop_last:  # every rank the same count: the first n // world_size of its shard
                shard = shard[: len(order) // self.world_size]
            order = shard
        n_full = len(order) // cfg.batch_size
        n = n_full if cfg.drop_last or len(order) % cfg.batch_size == 0 else n_full + 1
        return [order[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(n)]

    def plan_maker(self, epoch: int | None = None) -> PlanMaker:
        """What draws the plan of any batch of epoch ``epoch`` (default: the current one)."""
        cfg = self.config
        mix = ("sample" if cfg.mixtoken_per_sample else "batch") if cfg.draws_mix_box else None
        return PlanMaker(cfg.seed, self._epoch if epoch is None else epoch, self._sizes,
                         cfg.augment if cfg.augmenting else None, cfg.crop_pct,
                         erase=cfg.erase if cfg.augmenting else None, image_size=cfg.image_size, mix=mix,
                         grid=self.grid)

    # -- iteration -------------------------------------------------------------------------------
    def check_files_unchanged(self) -> None:
        """Raise if a mapped file this loader reads (the label store, the ``.beton``) changed since it
        was opened: run at every epoch start, so a rewritten file is an error naming it, not SIGBUS."""
        self.source.check_unchanged()
        check = getattr(self._backend, "check_unchanged", None)
        if check is not None:
            check()

    def _iterate(self, plans: EpochPlans):
        """The backend's stream, with a failure explained by a changed file when one changed (a
        worker killed by SIGBUS on a shrunken map says nothing of the cause)."""
        stream = self._backend.iterate(plans)
        try:
            yield from stream
        except Exception as err:
            try:
                self.check_files_unchanged()
            except Exception as changed:
                raise changed from err
            raise
        finally:
            stream.close()

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._epoch, self._step
        batches = self._batches(epoch)
        # The epoch's plans, one per batch, each drawn once (when the backend first asks for it)
        # and read by the backend (pixels), the device step and the label side alike.
        plans = EpochPlans(self.plan_maker(epoch), batches[start:], start)
        self.check_files_unchanged()
        stream = self._iterate(plans)
        try:
            step = start
            for images, idx, extras in stream:
                if step >= len(batches) or not np.array_equal(idx, batches[step]):
                    raise RuntimeError(f"{self.backend_name} backend delivered samples {idx[:4]}... at step {step}, "
                                       "expected the planned ones: backend and plan are out of step")
                batch = self._finish(images, extras, plans[step - start])
                plans.release(step - start)
                step += 1
                self._step = step
                yield batch
            if step != len(batches):
                raise RuntimeError(f"{self.backend_name} backend stopped after {step} of {len(batches)} batches")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self._epoch, self._step = epoch + 1, 0

    def _finish(self, images: torch.Tensor, extras: dict, plan: BatchPlan) -> Batch:
        cfg = self.config
        dev = self.device
        idx = plan.index
        images = images.to(dev, non_blocking=True)
        x = augment_batch(images, plan, normalize_output=not getattr(self._backend, "normalizes", False))
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = torch.from_numpy(self._targets[idx]).to(dev, non_blocking=True)
        label_affine = plan.affine
        if cfg.label_compat == "official" and self._map_geometry is not None:
            from ..compat import official_label_affine

            label_affine = official_label_affine(plan, self._map_geometry[2])
        affine = torch.from_numpy(label_affine).to(dev, torch.float32, non_blocking=True)
        maps = mix = None
        self.stats["batches"] += 1
        if self.has_token_labels:
            # Decoded by the backend where it made the images (pinned there, or by the DataLoader, for CUDA).
            t0 = time.perf_counter()
            maps = extras["maps"].to(dev, non_blocking=True)
            self.stats["label_s"] += extras.get("label_s", 0.0) + time.perf_counter() - t0
        if plan.mix is not None:  # also without token labels: a mixed-label baseline uses it
            mix = plan.mix.tensor(dev)
            if not cfg.mixtoken_per_sample:
                mix = mix[0]
        return Batch(images=x, labels=labels, maps=maps, affine=affine, mix_box=mix, grid=self.grid,
                     num_classes=self.num_classes, smoothing=cfg.smoothing if cfg.train else 0.0,
                     indices=idx, epoch=plan.epoch, step=plan.step, label_compat=cfg.label_compat, plan=plan)
