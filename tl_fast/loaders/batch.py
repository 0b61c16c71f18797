"""The batch type every backend yields, and the loader's configuration."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..compat import check_label_compat, official_smoothing
from ..plan import AugmentConfig, BatchPlan, EraseConfig


LABEL_MODES = ("tokens", "class")


@dataclass(frozen=True)
class LoaderConfig:
    """Everything that shapes a loader's output (the backends and the device step read it)."""

    batch_size: int
    image_size: int = 224
    patch_size: int = 16
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    erase: EraseConfig | None = field(default_factory=EraseConfig)
    mixtoken: bool | None = None  # draw MixToken boxes; None: yes for label_mode "tokens", no for "class"
    mixtoken_per_sample: bool = False
    smoothing: float = 0.1
    seed: int = 0
    train: bool = True
    drop_last: bool = True
    num_workers: int = 4
    channels_last: bool = False
    crop_pct: float = 0.875  # evaluation centre crop
    missing_labels: str = "error"  # or "one_hot": counted fall-back for images without a record
    bad_images: str = "skip"  # or "error": unreadable/truncated files found while indexing
    timeout_s: float = 300.0  # a backend that delivers nothing for this long raises
    token_labels: bool = True  # False: deliver no maps even when labels are available (plain labels)
    mismatched_images: str = "error"  # or "accept": images whose fingerprint differs from the store's
    # "tokens": targets for a model with token outputs (LV-ViT); "class": the same maps for a model
    # with class logits only (any classifier), supervised by the class-token target alone.
    label_mode: str = "tokens"
    # "official": the official TokenLabeling/ReLabel target path (swapped box order, flip before the
    # crop, smoothing t(1 - s + s/K) + s/K), to reproduce a published recipe (tl_fast.compat).
    label_compat: str = "tl_fast"

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, (int, np.integer)) \
                or self.num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s!r}")
        for name, allowed in (("missing_labels", ("error", "one_hot")), ("bad_images", ("skip", "error")),
                              ("mismatched_images", ("error", "accept"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must lie in [0, 1), got {self.smoothing}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        check_label_compat(self.label_compat)

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def draws_mix_box(self) -> bool:
        """Whether batches carry a MixToken box: when training with augmentation and ``mixtoken``
        (by default on for ``label_mode="tokens"``; a classifier cannot mix tokens, so off for "class")."""
        mix = self.mixtoken if self.mixtoken is not None else self.label_mode == "tokens"
        return bool(mix) and self.augmenting

    @property
    def augmenting(self) -> bool:
        """Training with the random plan (otherwise: the evaluation centre crop)."""
        return self.train and self.augment is not None

    @property
    def device_pixel_ops(self) -> bool:
        """Whether the device step must see uint8 levels (RandAugment runs there)."""
        return self.augmenting and self.augment.randaugment is not None


@dataclass
class Batch:
    """One batch: images on the device, class ids, and the label side of token labeling.

    images   [B, 3, S, S] float32, normalized (channels_last when asked)
    labels   [B] int64 class ids
    maps     top-k score maps on the device (``TopKMaps``), None without token labels
    affine   [B, 2, 3] float32, network input -> source image (normalized), what the labels follow
             (under ``label_compat="official"`` the official code's region, :mod:`tl_fast.compat`)
    mix_box  int32 ``[4]`` (one box for the batch) or ``[B, 4]`` (per sample) in token units, or None
    indices  [B] int64 dataset sample indices (numpy, host)
    label_compat  "tl_fast", or "official": targets smoothed as the official code does
    plan     the batch's :class:`tl_fast.plan.BatchPlan` (host side): every random draw the images
             and labels above were made with (crop, flip, RandAugment, erasing, MixToken box)
    """

    images: torch.Tensor
    labels: torch.Tensor
    maps: object | None
    affine: torch.Tensor
    mix_box: torch.Tensor | None
    grid: tuple[int, int]
    num_classes: int
    smoothing: float = 0.0
    indices: np.ndarray | None = None
    epoch: int = 0
    step: int = 0
    label_compat: str = "tl_fast"
    plan: BatchPlan | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def token_targets(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Soft targets ``[B, 1 + Gh*Gw, K]`` (class token first) from the maps, affines and box."""
        if self.maps is None:
            raise ValueError("this batch has no token labels (the loader was built without a label store, or train=False)")
        from .. import ops

        smoothing, scale = self._smoothing()
        t = ops.token_targets(self.maps.values, self.maps.indices, self.affine, num_classes=self.num_classes,
                              grid=self.grid, smoothing=smoothing, mix_box=self.mix_box, out_dtype=dtype)
        return t if scale == 1.0 else t.mul_(scale)

    def _smoothing(self) -> tuple[float, float]:
        """(smoothing, scale) for the token-target ops: the official smoothing is a scaled tl_fast one."""
        if self.label_compat == "official":
            return official_smoothing(self.smoothing, self.num_classes)
        return self.smoothing, 1.0

    def class_targets(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Class-token targets ``[B, K]`` alone (row 0 of :meth:`token_targets`, the token rows never built)."""
        if self.maps is None:
            raise ValueError("this batch has no token labels (the loader was built without a label store, or train=False)")
        from .. import ops

        return ops.class_targets(self.maps.values, self.maps.indices, self.affine, num_classes=self.num_classes,
                                 smoothing=self.smoothing, mix_box=self.mix_box, grid=self.grid, out_dtype=dtype,
                                 smoothing_rule=self.label_compat)

    def loss(self, cls_logits: torch.Tensor, token_logits: torch.Tensor | None = None, *, cls_weight: float = 1.0,
             dense_weight: float = 1.0, fused: bool = True) -> torch.Tensor:
        """Token-labeling loss of the model's outputs on this batch.

        ``fused=True`` lets the ops compute it from the compressed maps without materializing the
        targets (the fused kernels on CUDA); ``fused=False`` builds the targets first. Without
        ``token_logits`` (a classifier: ``label_mode="class"``) only the class-token target
        supervises ``cls_logits``: ``cls_weight * CE(cls_logits, class_targets())``, never building
        ``[B, 1 + Gh*Gw, K]``. A batch without maps falls back to cross-entropy with the class ids
        (label smoothing as configured), mixed by the MixToken box when it has one, as the
        token-labeling class target is."""
        from .. import ops
        from ..ops.class_loss import mixed_label_loss

        for name, logits in (("cls_logits", cls_logits), ("token_logits", token_logits)):
            if logits is not None and (logits.dim() < 2 or logits.shape[-1] != self.num_classes):
                raise ValueError(f"{name} has shape {tuple(logits.shape)}: the model predicts "
                                 f"{logits.shape[-1] if logits.dim() else 0} classes but the loader's labels have "
                                 f"K={self.num_classes}; build the model with num_classes={self.num_classes}")
        if self.maps is None:
            return mixed_label_loss(cls_logits, self.labels, self.mix_box, self.grid, self.smoothing)
        if token_logits is None:
            if fused:
                loss = ops.class_token_loss(cls_logits, maps=self.maps, affine=self.affine, mix_box=self.mix_box,
                                            num_classes=self.num_classes, grid=self.grid, smoothing=self.smoothing,
                                            smoothing_rule=self.label_compat)
            else:
                loss = ops.class_token_loss(cls_logits, self.class_targets(torch.float32))
            return cls_weight * loss
        if fused:
            # CE is linear in the target: the official smoothing's loss is a scaled tl_fast one.
            smoothing, scale = self._smoothing()
            loss = ops.token_label_loss(cls_logits, token_logits, maps=self.maps, affine=self.affine,
                                        mix_box=self.mix_box, num_classes=self.num_classes, grid=self.grid,
                                        smoothing=smoothing, cls_weight=cls_weight, dense_weight=dense_weight)
            return loss if scale == 1.0 else scale * loss
        targets = self.token_targets(torch.float32)
        return ops.token_label_loss(cls_logits, token_logits, targets, cls_weight=cls_weight,
                                    dense_weight=dense_weight)
