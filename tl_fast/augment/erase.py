"""timm's ``RandomErasing`` (pixel mode, one box), applied: the boxes and the noise seed are drawn
in the plan (:func:`tl_fast.plan.erase_boxes`, :func:`tl_fast.plan.noise_seed`; re-exported here)."""
from __future__ import annotations

import numpy as np
import torch

from ..plan import EraseConfig, erase_boxes, noise_seed  # noqa: F401  (the drawing side, re-exported)


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
