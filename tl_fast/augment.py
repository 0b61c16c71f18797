"""Device-side batch augmentation shared by every loader backend.

Backends deliver the plan's crop, resized and flipped, as uint8 ``[B, 3, S, S]``. This module finishes
the batch on the device, vectorized over the batch (a loop over the ~10 operation kinds, never over
samples):

1. RandAugment geometry: the plan's ``ra_affine`` (output -> input, normalized ``[0, 1]``
   coordinates, :mod:`tl_fast.geometry`) warps the image with ``grid_sample`` (bilinear,
   ``align_corners=False``), outside filled with timm's fill colour (the ImageNet mean as uint8); on
   CPU with OpenCV's ``warpAffine`` on uint8 instead (within one level, much cheaper). The labels use
   the same matrix through ``plan.affine``.
2. RandAugment photometric operations of timm's ``rand-m9-mstd0.5-inc1`` set, per sample with the
   plan's ``ra_op``/``ra_level``, in layer order, with PIL's integer semantics (each operation
   returns whole uint8 levels, blends truncate like ``Image.blend``).
   On CPU, steps 2 and 3's normalization run as per-sample look-up tables on uint8
   (:mod:`tl_fast.augment_cpu`), with the same results.
3. Normalization (ImageNet mean/std), then random erasing (timm's ``RandomErasing``: probability
   0.25, area 2%..1/3, aspect 0.3..3.3, one box, per-pixel normal noise). The box is drawn from the
   counter RNG keyed by ``(seed, epoch, sample index)`` on stream :data:`ERASE_STREAM`; the noise comes
   from a device generator keyed by ``(seed, epoch, first sample index of the batch)``.

One deliberate difference from timm: the geometric warp is applied once, composed, before the
photometric operations (timm interleaves them as drawn). The geometry is identical; only the fill
pixels may then also be touched by a later photometric operation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import rng
from .plan import RA_GEOMETRIC, RA_OPS, BatchPlan

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's fill colour for geometric RandAugment operations: the mean as uint8 levels.
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)
ERASE_STREAM = 101
ERASE_NOISE_STREAM = 102

_OP = {name: i for i, name in enumerate(RA_OPS)}
PHOTOMETRIC_OPS = tuple(n for n in RA_OPS if n not in RA_GEOMETRIC)
GEOMETRIC_IDS = np.array([_OP[n] for n in RA_GEOMETRIC], dtype=np.int64)


@dataclass(frozen=True)
class EraseConfig:
    """timm ``RandomErasing(probability, mode="pixel", max_count=1)``."""

    prob: float = 0.25
    min_area: float = 0.02
    max_area: float = 1.0 / 3.0
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def grid_sample_theta(affine: torch.Tensor) -> torch.Tensor:
    """Convert output -> input affines in ``[0, 1]`` coordinates to ``affine_grid``'s ``[-1, 1]`` ones.

    With ``g = 2x - 1``: ``A(u) = M u + c`` becomes ``theta(g) = M g + (M 1 + 2c - 1)``.
    """
    m = affine[:, :, :2]
    t = m.sum(-1) + 2.0 * affine[:, :, 2] - 1.0
    return torch.cat([m, t.unsqueeze(-1)], -1)


def warp(images: torch.Tensor, affine: torch.Tensor, fill=FILL) -> torch.Tensor:
    """Warp float images ``[B, C, H, W]`` (uint8 levels) by output -> input ``affine [B, 2, 3]``,
    bilinear, outside filled with ``fill``; returns whole levels (rounded, clamped) like PIL."""
    theta = grid_sample_theta(affine.to(device=images.device, dtype=torch.float32))
    # affine_grid's output, built by broadcasting (several times faster than its batched matmul on CPU):
    # pixel centres at g = (2i + 1) / n - 1 (align_corners=False).
    _, _, h, w = images.shape
    gu = (torch.arange(w, device=images.device, dtype=torch.float32) * 2 + 1) / w - 1
    gv = (torch.arange(h, device=images.device, dtype=torch.float32) * 2 + 1) / h - 1
    t = theta[:, :, :, None, None]
    gx = t[:, 0, 0] * gu.view(1, 1, w) + (t[:, 0, 1] * gv.view(1, h, 1) + t[:, 0, 2])
    gy = t[:, 1, 0] * gu.view(1, 1, w) + (t[:, 1, 1] * gv.view(1, h, 1) + t[:, 1, 2])
    grid = torch.stack([gx, gy], -1).to(images.dtype)
    fill_t = torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    # Sampling (image - fill) with zero padding then adding fill back blends edges toward the fill.
    out = F.grid_sample(images - fill_t, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill_t
    return out.round_().clamp_(0, 255)


def pixel_affines(affine: np.ndarray, height: int, width: int) -> np.ndarray:
    """Output -> input affines ``[B, 2, 3]`` in ``[0, 1]`` coordinates as pixel-index ones (pixel
    centres at ``(p + 0.5) / size``), the form OpenCV's ``warpAffine`` takes with ``WARP_INVERSE_MAP``:
    ``p_in = S M S^-1 p_out + S (M S^-1 1/2 + c) - 1/2`` with ``S = diag(width, height)``."""
    a = np.asarray(affine, dtype=np.float64)
    scale = np.array([width, height], dtype=np.float64)
    m = a[:, :, :2] * scale[None, :, None] / scale[None, None, :]
    t = m.sum(-1) * 0.5 + a[:, :, 2] * scale[None, :] - 0.5
    return np.concatenate([m, t[..., None]], -1)


def opencv():
    """The ``cv2`` module, or None where OpenCV is not installed (the CPU paths then use torch)."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def warp_uint8_cv2(images: torch.Tensor, affine: np.ndarray, fill=FILL) -> torch.Tensor | None:
    """:func:`warp` for uint8 CPU images ``[B, 3, H, W]`` with OpenCV's fixed-point bilinear
    ``warpAffine`` (outside filled with ``fill``); returns uint8, or None without OpenCV.

    About 2-2.5x faster than ``grid_sample`` on CPU, and within one level of :func:`warp` on every pixel
    (tests/test_augment.py). The CPU path of :func:`augment_batch`; a GPU keeps ``grid_sample``."""
    cv2 = opencv()
    if cv2 is None:
        return None
    h, w = images.shape[-2:]
    src = images.contiguous().numpy()
    out = np.empty_like(src)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for i, mat in enumerate(pixel_affines(affine, h, w)):
        for c in range(src.shape[1]):  # plane by plane: no HWC copies
            cv2.warpAffine(src[i, c], mat, (w, h), dst=out[i, c], flags=flags, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=float(fill[c]))
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# Photometric operations: x [n, 3, H, W] float holding uint8 levels, level [n] float
# --------------------------------------------------------------------------------------------

def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, x, factor)`` on uint8 levels (float32 maths, truncation)."""
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (degenerate + f * (x - degenerate)).clamp_(0, 255).floor_()


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` (ITU-R 601-2, fixed point with rounding): ``[n, 1, H, W]``."""
    r, g, b = x[:, 0:1].long(), x[:, 1:2].long(), x[:, 2:3].long()
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(x.dtype)


def autocontrast_lut(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast``'s table for channels spanning ``[lo, hi]`` (``[m]`` each):
    ``lut[i] = int(i * scale + offset)`` in float64 as PIL's Python loop, identity for a flat channel.
    Returns float64 ``[m, 256]`` whole levels."""
    lo, hi = lo.double().view(-1, 1), hi.double().view(-1, 1)
    scale = 255.0 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, dtype=torch.float64, device=lo.device).view(1, 256)
    lut = (levels * scale - lo * scale).clamp_(0, 255).trunc_()
    return torch.where(hi > lo, lut, levels)


def auto_contrast(x: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` per channel (:func:`autocontrast_lut`)."""
    n, c, h, w = x.shape
    lut = autocontrast_lut(x.amin(dim=(2, 3)), x.amax(dim=(2, 3))).to(x.dtype)
    return lut.gather(1, x.long().clamp_(0, 255).reshape(n * c, h * w)).view(n, c, h, w)


def equalize_lut(hist: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize``'s table for channels with histograms ``hist [m, 256]``:
    ``lut[i] = (step // 2 + sum(h[:i])) // step`` with ``step = (pixels - count of the last non-empty
    level) // 255``; identity when ``step == 0`` or one level is used. Returns int64 ``[m, 256]``."""
    hist = hist.long()
    nonzero = hist > 0
    last = 255 - nonzero.flip(-1).long().argmax(-1)  # last non-empty level
    last_count = hist.gather(1, last.view(-1, 1)).squeeze(1)
    step = (hist.sum(-1) - last_count) // 255
    safe = step.clamp(min=1).view(-1, 1)
    cum = torch.cumsum(hist, -1) - hist  # exclusive prefix sums
    lut = ((safe // 2 + cum) // safe).clamp_(max=255)
    keep = ((step == 0) | (nonzero.sum(-1) <= 1)).view(-1, 1)
    return torch.where(keep, torch.arange(256, device=hist.device).view(1, 256), lut)


def equalize(x: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
    """PIL ``ImageOps.equalize`` per channel (:func:`equalize_lut`)."""
    n, c, h, w = x.shape
    # Flat (sample, channel, level) ids: one bincount gives every histogram (several times faster
    # than index_add_ on CPU) and the same ids look the output up in the stacked tables.
    ids = x.long().clamp_(0, 255).reshape(n * c, h * w) + torch.arange(n * c, device=x.device).view(-1, 1) * 256
    hist = torch.bincount(ids.view(-1), minlength=n * c * 256).view(n * c, 256)
    return equalize_lut(hist).view(-1).take(ids).to(x.dtype).view(n, c, h, w)


def invert(x: torch.Tensor, level: torch.Tensor | None = None) -> torch.Tensor:
    return 255.0 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    b = bits.long().clamp(0, 8).view(-1, 1, 1, 1)
    mask = 256 - (1 << (8 - b))
    return (x.long() & mask).to(x.dtype)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    t = threshold.view(-1, 1, 1, 1).to(x.dtype)
    return torch.where(x >= t, 255.0 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, threshold: float = 128.0) -> torch.Tensor:
    a = add.view(-1, 1, 1, 1).to(x.dtype)
    return (x + a * (x < threshold)).clamp_(max=255)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_grayscale(x).expand_as(x), x, factor)


def contrast_mean(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``'s degenerate level: the rounded mean of the grayscale image, ``[n, 1, 1, 1]``."""
    return torch.floor(_grayscale(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(contrast_mean(x).expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH filter (3x3 ones, centre 5, total 13,
    rounded); border pixels of the filtered image are the original's, as in PIL. The 3x3 sum is two
    passes of shifted-slice additions: exact on integer levels, and faster on CPU than a depthwise
    convolution or an average pool."""
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box9 = rows[:, :, :, :-2] + rows[:, :, :, 1:-1] + rows[:, :, :, 2:]
    smooth = torch.floor((box9 + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0 + 0.5).clamp_(0, 255)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


PHOTOMETRIC = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness,
}
assert set(PHOTOMETRIC) == set(PHOTOMETRIC_OPS)


def apply_photometric(x: torch.Tensor, ra_op: np.ndarray, ra_level: np.ndarray) -> torch.Tensor:
    """Apply each sample's photometric operations in layer order (geometric ids and -1 are skipped).

    ``x`` float ``[B, 3, H, W]`` uint8 levels (modified in place and returned)."""
    ra_op = np.asarray(ra_op).reshape(len(x), -1)
    ra_level = np.asarray(ra_level, dtype=np.float64).reshape(len(x), -1)
    groups = [(name, j, sel) for j in range(ra_op.shape[1]) for name in PHOTOMETRIC_OPS
              if len(sel := np.flatnonzero(ra_op[:, j] == _OP[name]))]
    if not groups:
        return x
    # Every group's sample indices and levels in one host-to-device copy each (not two per group).
    idx_all = torch.from_numpy(np.concatenate([sel for _, _, sel in groups])).to(x.device)
    level_all = torch.from_numpy(np.concatenate([ra_level[sel, j] for _, j, sel in groups]).astype(np.float32)
                                 ).to(x.device)
    start = 0
    for name, _, sel in groups:
        idx, level = idx_all[start:start + len(sel)], level_all[start:start + len(sel)]
        start += len(sel)
        x.index_copy_(0, idx, PHOTOMETRIC[name](x.index_select(0, idx), level))
    return x


# --------------------------------------------------------------------------------------------
# Normalization and random erasing
# --------------------------------------------------------------------------------------------

def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 levels -> ``(x / 255 - mean) / std`` (in place for float input)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.mul_(1.0 / 255.0).sub_(m).div_(s)


def erase_boxes(seed: int, epoch: int, indices: np.ndarray, size: tuple[int, int],
                cfg: EraseConfig = EraseConfig()) -> np.ndarray:
    """timm's RandomErasing box per sample, ``[B, 4]`` = (top, left, h, w); ``h = w = 0`` for none.

    Draws: the apply test, then ten attempts of (area, log-aspect, top, left), first valid wins."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    img_h, img_w = size
    u = rng.uniform(seed, epoch, indices, ERASE_STREAM, 41)
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


def random_erase(x: torch.Tensor, boxes: np.ndarray, noise_seed: int) -> torch.Tensor:
    """Replace each box of ``x [B, C, H, W]`` (normalized) by standard normal noise, per pixel.

    Only the erased pixels' noise is drawn (the count is known on the host: no device sync), and
    it fills the boxes in (sample, channel, row, column) order."""
    sel = np.flatnonzero(boxes[:, 2] > 0)
    if len(sel) == 0:
        return x
    count = int((boxes[sel, 2] * boxes[sel, 3]).sum()) * x.shape[1]
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(noise_seed) & 0x7FFFFFFFFFFFFFFF)
    noise = torch.randn(count, generator=gen, device=x.device, dtype=x.dtype)
    # CPU: a copy per box is cheaper than building masks; GPU: a few batched kernels instead of
    # one small launch per box. Both give the same tensor (tests/test_augment.py).
    fill = _erase_by_copies if x.device.type == "cpu" else _erase_by_mask
    return fill(x, boxes, sel, noise)


def _erase_by_copies(x: torch.Tensor, boxes: np.ndarray, sel: np.ndarray, noise: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    start = 0
    for i in sel:
        top, left, bh, bw = (int(v) for v in boxes[i])
        x[i, :, top:top + bh, left:left + bw] = noise[start:start + c * bh * bw].view(c, bh, bw)
        start += c * bh * bw
    return x


def _erase_by_mask(x: torch.Tensor, boxes: np.ndarray, sel: np.ndarray, noise: torch.Tensor) -> torch.Tensor:
    dev = x.device
    h, w = x.shape[2:]
    idx = torch.from_numpy(sel).to(dev)
    b = torch.from_numpy(boxes[sel]).to(dev)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((ys >= b[:, 0, None, None]) & (ys < (b[:, 0] + b[:, 2])[:, None, None])
              & (xs >= b[:, 1, None, None]) & (xs < (b[:, 1] + b[:, 3])[:, None, None])).unsqueeze(1)
    sub = x.index_select(0, idx)
    sub.masked_scatter_(inside.expand_as(sub), noise)
    x.index_copy_(0, idx, sub)
    return x


# --------------------------------------------------------------------------------------------
# The whole device step
# --------------------------------------------------------------------------------------------

def augment_batch(
    images: torch.Tensor, plan: BatchPlan, *, seed: int, epoch: int, erase: EraseConfig | None = EraseConfig(),
    normalize_output: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
) -> torch.Tensor:
    """Finish a batch: uint8 ``[B, 3, S, S]`` (on the target device) -> float32 normalized images.

    Applies the plan's RandAugment warp and photometric operations, normalizes, and erases. With
    ``normalize_output=False`` the images are already normalized floats (a backend normalized them)
    and only erasing runs."""
    if normalize_output:
        geo = np.isin(plan.ra_op, GEOMETRIC_IDS).any(1) if plan.ra_op.size else np.zeros(len(images), bool)
        sel = np.flatnonzero(geo)
        x = None
        if images.device.type == "cpu" and images.dtype == torch.uint8:
            # CPU: OpenCV's uint8 warp, then the photometric operations and normalization as tables.
            from .augment_cpu import augment_photometric_normalize

            warped = warp_uint8_cv2(images[sel], plan.ra_affine[sel]) if len(sel) else None
            if warped is not None or not len(sel):
                x = augment_photometric_normalize(images, plan.ra_op, plan.ra_level, mean, std,
                                                  replaced=dict(zip(sel.tolist(), warped)) if len(sel) else None)
        if x is None:
            x = images.float()
            if len(sel):
                idx = torch.from_numpy(sel).to(x.device)
                aff = torch.from_numpy(plan.ra_affine[sel]).to(x.device, torch.float32)
                x.index_copy_(0, idx, warp(x.index_select(0, idx), aff))
            if plan.ra_op.size:
                apply_photometric(x, plan.ra_op, plan.ra_level)
            x = normalize(x, mean, std)
    else:
        x = images.float()
    if erase is not None and erase.prob > 0:
        boxes = erase_boxes(seed, epoch, plan.index, tuple(x.shape[-2:]), erase)
        noise_seed = int(rng.hash_keys(seed, epoch, plan.index[:1], ERASE_NOISE_STREAM)[0])
        x = random_erase(x, boxes, noise_seed)
    return x
