"""The geometry plan: every sample's augmentation, drawn once, as a pure function of its key.

``plan_batch(seed, epoch, indices, sizes, config)`` returns a :class:`BatchPlan` whose crops, flips,
RandAugment parameters and composed affines are a function of ``(seed, epoch, sample index, image
size)`` only. Image backends crop by ``plan.crop``; label ops use ``plan.affine``. No backend draws
its own crop, so images and labels agree by construction, in any process, on any resume.

``draw_mix_box`` draws MixToken boxes keyed by ``(seed, epoch, step)`` (one per batch, as in the
paper) or by sample index (one per sample); ``erase_boxes`` and ``noise_seed`` draw timm's random
erasing. These are the drawing primitives; the loader composes them into one frozen
:class:`BatchPlan` per batch (:class:`tl_fast.loaders.common.PlanMaker`), which the image backends,
the device step (:mod:`tl_fast.augment`, which draws nothing) and the label side all read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import geometry, rng

from .rng import Stream

# timm's ``rand-*-inc1`` operation list (``_RAND_INCREASING_TRANSFORMS``), in timm's order.
RA_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RA_GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
RA_OP_ID = {name: i for i, name in enumerate(RA_OPS)}


@dataclass(frozen=True)
class RandAugmentConfig:
    """timm's ``rand-m{magnitude}-mstd{magnitude_std}-inc1`` with ``num_layers`` operations."""

    num_layers: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    magnitude_max: float = 10.0
    prob: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> "RandAugmentConfig":
        """Parse a timm-style string such as ``"rand-m9-mstd0.5-inc1"`` (``n`` sets layers)."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand-', got {spec!r}")
        kw: dict = {}
        for p in parts[1:]:
            if p.startswith("mstd"):
                kw["magnitude_std"] = float(p[4:])
            elif p.startswith("mmax"):
                kw["magnitude_max"] = float(p[4:])
            elif p.startswith("inc"):
                if p != "inc1":
                    raise ValueError("only the increasing operation set (inc1) is supported")
            elif p.startswith("m"):
                kw["magnitude"] = float(p[1:])
            elif p.startswith("n"):
                kw["num_layers"] = int(p[1:])
            else:
                raise ValueError(f"unknown RandAugment option {p!r} in {spec!r}")
        return cls(**kw)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample training augmentation (timm's ImageNet recipe by default)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    randaugment: RandAugmentConfig | None = field(default_factory=RandAugmentConfig)


@dataclass(frozen=True)
class BatchPlan:
    """Everything random about one batch (numpy arrays, host side), drawn once and read by all sides.

    index:     [B] int64 dataset sample indices
    crop:      [B, 4] int64, ``(top, left, height, width)`` in source pixels (torchvision's order)
    box:       [B, 4] float64, the crop normalized as ``(x1, y1, x2, y2)``
    flip:      [B] bool
    ra_op:     [B, L] int64 index into :data:`RA_OPS` (-1: skipped)
    ra_level:  [B, L] float64, the operation's argument (degrees, shear factor, bits, ...)
    ra_affine: [B, 2, 3] output -> pre-RandAugment image map (identity without geometric ops)
    affine:    [B, 2, 3] output -> source map, ``crop_flip ∘ ra_affine``: what the labels use
    erase:     [B, 4] int64 random-erasing boxes ``(top, left, h, w)`` in output pixels (``h = 0``:
               none), or None when the batch is not erased
    noise_seed: seed of the erasing noise (one per batch)
    mix:       the MixToken box(es), or None
    epoch, step: where in the run the batch is (the keys of its draws)
    """

    index: np.ndarray
    crop: np.ndarray
    box: np.ndarray
    flip: np.ndarray
    ra_op: np.ndarray
    ra_level: np.ndarray
    ra_affine: np.ndarray
    affine: np.ndarray
    erase: np.ndarray | None = None
    noise_seed: int = 0
    mix: MixBox | None = None
    epoch: int = 0
    step: int = 0

    def affine_tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(self.affine, dtype=dtype, device=device)

    def __len__(self) -> int:
        return len(self.index)


def random_resized_crop(
    seed: int, epoch: int, indices: np.ndarray, sizes: np.ndarray,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params``, vectorized: ``[B, 4]`` (top, left, h, w).

    ``sizes`` is ``[B, 2]`` (height, width). Ten attempts, the first valid one wins, then the
    centre-crop fallback, exactly as torchvision; only the random source differs (counter-based).
    """
    indices = np.asarray(indices, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    u = rng.uniform(seed, epoch, indices, Stream.CROP, 40).reshape(-1, 10, 4)
    area = (height * width)[:, None]
    target_area = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = np.exp(log_r[0] + u[..., 1] * (log_r[1] - log_r[0]))
    w = np.round(np.sqrt(target_area * aspect))
    h = np.round(np.sqrt(target_area / aspect))
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    top = np.floor(u[..., 2] * (height[:, None] - h + 1))
    left = np.floor(u[..., 3] * (width[:, None] - w + 1))
    first = np.argmax(ok, axis=1)
    found = ok.any(axis=1)
    rows = np.arange(len(indices))
    out = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], axis=1)

    # Centre-crop fallback.
    in_ratio = width / height
    fw = np.where(in_ratio < min(ratio), width, np.where(in_ratio > max(ratio), np.round(height * max(ratio)), width))
    fh = np.where(in_ratio < min(ratio), np.round(width / min(ratio)), height)
    fallback = np.stack([(height - fh) // 2, (width - fw) // 2, fh, fw], axis=1)
    return np.where(found[:, None], out, fallback).astype(np.int64)


def _randaugment(seed: int, epoch: int, indices: np.ndarray, cfg: RandAugmentConfig):
    n, layers = len(indices), cfg.num_layers
    op = np.floor(rng.uniform(seed, epoch, indices, Stream.RA_OP, layers) * len(RA_OPS)).astype(np.int64)
    apply = rng.uniform(seed, epoch, indices, Stream.RA_APPLY, layers) < cfg.prob
    mag = cfg.magnitude + cfg.magnitude_std * rng.normal(seed, epoch, indices, Stream.RA_MAG, layers)
    if cfg.magnitude_std <= 0:
        mag = np.full((n, layers), cfg.magnitude)
    mag = np.clip(mag, 0.0, cfg.magnitude_max) / cfg.magnitude_max
    sign = np.where(rng.uniform(seed, epoch, indices, Stream.RA_SIGN, layers) > 0.5, -1.0, 1.0)
    # timm's level functions for the increasing set.
    level = np.zeros((n, layers))
    level = np.where(op == RA_OP_ID["Rotate"], 30.0 * mag * sign, level)
    level = np.where((op == RA_OP_ID["ShearX"]) | (op == RA_OP_ID["ShearY"]), 0.3 * mag * sign, level)
    level = np.where((op == RA_OP_ID["TranslateXRel"]) | (op == RA_OP_ID["TranslateYRel"]), 0.45 * mag * sign, level)
    level = np.where(op == RA_OP_ID["PosterizeIncreasing"], 4 - np.floor(mag * 4), level)
    level = np.where(op == RA_OP_ID["SolarizeIncreasing"], 256 - np.floor(mag * 256), level)
    level = np.where(op == RA_OP_ID["SolarizeAdd"], np.floor(mag * 110), level)
    enhance = [RA_OP_ID[k] for k in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")]
    level = np.where(np.isin(op, enhance), 1.0 + 0.9 * mag * sign, level)
    op = np.where(apply, op, -1)

    # Geometric operations compose in application order: output -> input = M_1 ∘ M_2 ∘ ... ∘ M_L.
    ra_affine = geometry.identity(n)
    for j in range(layers):
        m = geometry.identity(n)
        lv = level[:, j]
        for name, fn in (("Rotate", geometry.rotate), ("ShearX", geometry.shear_x), ("ShearY", geometry.shear_y)):
            sel = op[:, j] == RA_OP_ID[name]
            m[sel] = fn(lv[sel])
        sel = op[:, j] == RA_OP_ID["TranslateXRel"]
        m[sel] = geometry.translate(lv[sel], np.zeros(sel.sum()))
        sel = op[:, j] == RA_OP_ID["TranslateYRel"]
        m[sel] = geometry.translate(np.zeros(sel.sum()), lv[sel])
        ra_affine = geometry.compose(ra_affine, m)
    return op, level, ra_affine


def plan_batch(
    seed: int, epoch: int, indices, sizes, config: AugmentConfig | None = None
) -> BatchPlan:
    """The plan for samples ``indices`` whose source images are ``sizes [B, 2]`` = (height, width)."""
    config = config or AugmentConfig()
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if len(sizes) != len(indices):
        raise ValueError(f"plan_batch: {len(indices)} indices but {len(sizes)} image sizes")
    if (sizes <= 0).any():
        raise ValueError("plan_batch: image sizes must be positive (height, width) pairs")
    crop = random_resized_crop(seed, epoch, indices, sizes, config.scale, config.ratio)
    h, w = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    box = np.stack([crop[:, 1] / w, crop[:, 0] / h, (crop[:, 1] + crop[:, 3]) / w, (crop[:, 0] + crop[:, 2]) / h], 1)
    flip = rng.uniform(seed, epoch, indices, Stream.FLIP, 1)[:, 0] < config.hflip
    if config.randaugment is not None:
        ra_op, ra_level, ra_affine = _randaugment(seed, epoch, indices, config.randaugment)
    else:
        ra_op = np.full((len(indices), 0), -1, dtype=np.int64)
        ra_level = np.zeros((len(indices), 0))
        ra_affine = geometry.identity(len(indices))
    affine = geometry.compose(geometry.crop_flip_affine_np(box, flip), ra_affine)
    return BatchPlan(indices, crop, box, flip, ra_op, ra_level, ra_affine, affine, epoch=epoch)


def center_crop_plan(indices, sizes, crop_pct: float = 0.875) -> BatchPlan:
    """Evaluation geometry: the centre square covering ``crop_pct`` of the shorter side, no flip."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    side = np.floor(np.minimum(sizes[:, 0], sizes[:, 1]) * crop_pct).clip(min=1)
    top = np.round((sizes[:, 0] - side) / 2.0)
    left = np.round((sizes[:, 1] - side) / 2.0)
    crop = np.stack([top, left, side, side], 1).astype(np.int64)
    h, w = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    box = np.stack([left / w, top / h, (left + side) / w, (top + side) / h], 1)
    flip = np.zeros(len(indices), dtype=bool)
    n = len(indices)
    return BatchPlan(indices, crop, box, flip, np.full((n, 0), -1, np.int64), np.zeros((n, 0)),
                     geometry.identity(n), geometry.crop_flip_affine_np(box, flip))


@dataclass(frozen=True)
class MixBox:
    """MixToken box(es) in token units: rows ``[r1, r2)``, columns ``[c1, c2)``; ``lam`` per box."""

    boxes: np.ndarray  # [N, 4] int64 (r1, c1, r2, c2); N = 1 (per batch) or B (per sample)
    lam: np.ndarray  # [N] float64

    def tensor(self, device=None) -> torch.Tensor:
        return torch.as_tensor(self.boxes, dtype=torch.int32, device=device)


def draw_mix_box(seed: int, epoch: int, keys, grid: tuple[int, int] = (14, 14)) -> MixBox:
    """LV-ViT's ``rand_bbox`` on the token grid, keyed by ``keys`` (a step for a per-batch box, or
    sample indices for per-sample boxes): ``lam ~ Beta(1, 1)``, side ratio ``sqrt(1 - lam)``,
    uniform centre, clipped, and ``lam`` recomputed from the clipped area."""
    keys = np.atleast_1d(np.asarray(keys, dtype=np.int64))
    gh, gw = grid
    u = rng.uniform(seed, epoch, keys, Stream.MIX_BOX, 3)
    lam = u[:, 0]
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = np.floor(gh * cut).astype(np.int64), np.floor(gw * cut).astype(np.int64)
    cy = np.floor(u[:, 1] * gh).astype(np.int64)
    cx = np.floor(u[:, 2] * gw).astype(np.int64)
    r1, r2 = np.clip(cy - cut_h // 2, 0, gh), np.clip(cy + cut_h // 2, 0, gh)
    c1, c2 = np.clip(cx - cut_w // 2, 0, gw), np.clip(cx + cut_w // 2, 0, gw)
    lam = 1.0 - (r2 - r1) * (c2 - c1) / float(gh * gw)
    return MixBox(np.stack([r1, c1, r2, c2], 1), lam)


@dataclass(frozen=True)
class EraseConfig:
    """timm ``RandomErasing(probability, mode="pixel", max_count=1)``."""

    prob: float = 0.25
    min_area: float = 0.02
    max_area: float = 1.0 / 3.0
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect


def erase_boxes(seed: int, epoch: int, indices: np.ndarray, size: tuple[int, int],
                cfg: EraseConfig = EraseConfig()) -> np.ndarray:
    """timm's RandomErasing box per sample, ``[B, 4]`` = (top, left, h, w); ``h = w = 0`` for none.

    Draws: the apply test, then ten attempts of (area, log-aspect, top, left), first valid wins."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    img_h, img_w = size
    u = rng.uniform(seed, epoch, indices, Stream.ERASE, 41)
    apply = u[:, 0] < cfg.prob
    att = u[:, 1:].reshape(-1, 10, 4)
    max_aspect = cfg.max_aspect if cfg.max_aspect is not None else 1.0 / cfg.min_aspect
    log_a = (math.log(cfg.min_aspect), math.log(max_aspect))
    area = img_h * img_w * (cfg.min_area + att[..., 0] * (cfg.max_area - cfg.min_area))
    aspect = np.exp(log_a[0] + att[..., 1] * (log_a[1] - log_a[0]))
    h = np.round(np.sqrt(area * aspect))
    w = np.round(np.sqrt(area / aspect))
    ok = (w < img_w) & (h < img_h) & (h > 0) & (w > 0)
    top = np.floor(att[..., 2] * (img_h - h + 1))
    left = np.floor(att[..., 3] * (img_w - w + 1))
    first = ok.argmax(1)
    rows = np.arange(len(indices))
    found = ok.any(1) & apply
    out = np.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], 1)
    return np.where(found[:, None], out, 0).astype(np.int64)


def noise_seed(seed: int, epoch: int, indices: np.ndarray) -> int:
    """The seed of a batch's erasing noise: keyed by ``(seed, epoch, first sample index)``."""
    return int(rng.hash_keys(seed, epoch, np.asarray(indices)[:1], Stream.ERASE_NOISE)[0])


def with_erase(plan: BatchPlan, seed: int, size: tuple[int, int], cfg: EraseConfig = EraseConfig()) -> BatchPlan:
    """``plan`` with its batch's random-erasing boxes (for output images of ``size``) and noise seed,
    keyed by the plan's epoch and sample indices."""
    return replace(plan, erase=erase_boxes(seed, plan.epoch, plan.index, size, cfg),
                   noise_seed=noise_seed(seed, plan.epoch, plan.index))
