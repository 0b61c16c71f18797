"""timm's photometric RandAugment operations with PIL's integer semantics, batched over samples.

Every operation takes ``x [n, 3, H, W]`` float holding uint8 levels and a level ``[n]`` float, and
returns whole levels (blends truncate like ``Image.blend``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..plan import RA_GEOMETRIC, RA_OP_ID, RA_OPS

PHOTOMETRIC_OPS = tuple(n for n in RA_OPS if n not in RA_GEOMETRIC)
GEOMETRIC_IDS = np.array([RA_OP_ID[n] for n in RA_GEOMETRIC], dtype=np.int64)


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
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
    return blend(_grayscale(x).expand_as(x), x, factor)


def contrast_mean(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``'s degenerate level: the rounded mean of the grayscale image, ``[n, 1, 1, 1]``."""
    return torch.floor(_grayscale(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(contrast_mean(x).expand_as(x), x, factor)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(x), x, factor)


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
    return blend(degenerate, x, factor)


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
              if len(sel := np.flatnonzero(ra_op[:, j] == RA_OP_ID[name]))]
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
