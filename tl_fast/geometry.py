"""Affine maps from the network input to the source image, in normalized coordinates.

Convention (docs/spec.md section 3): an affine ``A : [2, 3]`` sends a point ``(u, v)`` of the network input
(``u`` along width, ``v`` along height, both in ``[0, 1]``, pixel centres at ``(i + 0.5) / size``) to
``(x, y) = A @ (u, v, 1)`` in the source image, also normalized. The same matrix drives the label
kernels and the device-side warp of the image, so both follow one geometry.

Composition order: an augmented image is ``randaugment(flip(crop(source)))``, so the map from
output to source applies the RandAugment map first, then the crop-and-flip map:
``A = crop_flip ∘ ra``.
"""
from __future__ import annotations

import numpy as np
import torch


def crop_flip_affine(boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Affines ``[B, 2, 3]`` for crop boxes ``[B, 4]`` = ``(x1, y1, x2, y2)`` and flips ``[B]`` (bool)."""
    boxes = torch.as_tensor(boxes)
    if not boxes.is_floating_point():
        boxes = boxes.double()
    flip = torch.as_tensor(flip, dtype=torch.bool, device=boxes.device)
    return torch.from_numpy(crop_flip_affine_np(boxes.cpu().numpy(), flip.cpu().numpy())).to(
        device=boxes.device, dtype=boxes.dtype
    )


def crop_flip_affine_np(boxes: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`crop_flip_affine` (float64)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    flip = np.asarray(flip, dtype=bool).reshape(-1)
    x1, y1, x2, y2 = boxes.T
    a = np.zeros((len(boxes), 2, 3), dtype=np.float64)
    a[:, 0, 0] = np.where(flip, x1 - x2, x2 - x1)
    a[:, 0, 2] = np.where(flip, x2, x1)
    a[:, 1, 1] = y2 - y1
    a[:, 1, 2] = y1
    return a


def to_homogeneous(a: np.ndarray) -> np.ndarray:
    """``[..., 2, 3]`` -> ``[..., 3, 3]``."""
    out = np.zeros(a.shape[:-2] + (3, 3), dtype=np.float64)
    out[..., :2, :] = a
    out[..., 2, 2] = 1.0
    return out


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer ∘ inner`` for batches of ``[..., 2, 3]`` affines: apply ``inner`` first."""
    return (to_homogeneous(outer) @ to_homogeneous(inner))[..., :2, :]


def identity(batch: int) -> np.ndarray:
    a = np.zeros((batch, 2, 3), dtype=np.float64)
    a[:, 0, 0] = a[:, 1, 1] = 1.0
    return a


# RandAugment geometry, as output -> input maps in normalized coordinates of a square image.
# They follow timm's PIL operations: PIL's AFFINE data maps an output pixel to the input pixel,
# rotation is counter-clockwise about the centre.

def rotate(degrees: np.ndarray) -> np.ndarray:
    """Image rotated counter-clockwise by ``degrees`` about its centre (PIL ``Image.rotate``)."""
    t = -np.radians(np.asarray(degrees, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    a = np.zeros(t.shape + (2, 3), dtype=np.float64)
    a[..., 0, 0], a[..., 0, 1] = c, s
    a[..., 1, 0], a[..., 1, 1] = -s, c
    a[..., 0, 2] = 0.5 - c * 0.5 - s * 0.5
    a[..., 1, 2] = 0.5 + s * 0.5 - c * 0.5
    return a


def shear_x(factor: np.ndarray) -> np.ndarray:
    """PIL affine ``(1, f, 0, 0, 1, 0)``: ``x_in = u + f * v``."""
    f = np.asarray(factor, dtype=np.float64)
    a = np.zeros(f.shape + (2, 3), dtype=np.float64)
    a[..., 0, 0] = a[..., 1, 1] = 1.0
    a[..., 0, 1] = f
    return a


def shear_y(factor: np.ndarray) -> np.ndarray:
    """PIL affine ``(1, 0, 0, f, 1, 0)``: ``y_in = f * u + v``."""
    f = np.asarray(factor, dtype=np.float64)
    a = np.zeros(f.shape + (2, 3), dtype=np.float64)
    a[..., 0, 0] = a[..., 1, 1] = 1.0
    a[..., 1, 0] = f
    return a


def translate(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """PIL affine ``(1, 0, dx, 0, 1, dy)`` in fractions of the image size."""
    dx = np.asarray(dx, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    a = np.zeros(np.broadcast(dx, dy).shape + (2, 3), dtype=np.float64)
    a[..., 0, 0] = a[..., 1, 1] = 1.0
    a[..., 0, 2] = dx
    a[..., 1, 2] = dy
    return a


def apply_affine(a: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map points: ``a [B, 2, 3]``, ``u, v [B, ...]`` -> ``x, y [B, ...]``."""
    shape = (a.shape[0],) + (1,) * (u.dim() - 1)
    x = a[:, 0, 0].reshape(shape) * u + a[:, 0, 1].reshape(shape) * v + a[:, 0, 2].reshape(shape)
    y = a[:, 1, 0].reshape(shape) * u + a[:, 1, 1].reshape(shape) * v + a[:, 1, 2].reshape(shape)
    return x, y
