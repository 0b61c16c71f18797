"""timm's ``RandomErasing`` (pixel mode, one box): boxes keyed by sample index, noise keyed by batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import rng
from ..rng import Stream


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


def noise_seed(seed: int, epoch: int, indices: np.ndarray) -> int:
    """The seed of a batch's erasing noise: keyed by ``(seed, epoch, first sample index)``."""
    return int(rng.hash_keys(seed, epoch, np.asarray(indices)[:1], Stream.ERASE_NOISE)[0])
