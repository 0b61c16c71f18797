"""RandAugment's geometric operations as one composed warp per sample (the plan's ``ra_affine``).

``warp`` is the reference (``grid_sample``, float); ``warp_uint8_cv2`` is the CPU path (OpenCV's
fixed-point ``warpAffine`` on uint8), within one level of it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .normalize import IMAGENET_MEAN

# timm's fill colour for geometric RandAugment operations: the mean as uint8 levels.
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)


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

    Faster than ``grid_sample`` on CPU (BENCHMARKS.md) and within one level of :func:`warp` on every
    pixel (tests/test_augment.py). The CPU path of :func:`augment_batch`; a GPU keeps ``grid_sample``."""
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
