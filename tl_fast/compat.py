"""The official TokenLabeling / ReLabel target path where it differs from tl_fast (``label_compat="official"``).

tl_fast computes docs/spec.md section 3. The official code (zihangJiang/TokenLabeling ``tlt/data``, which
adapts naver-ai/relabel_imagenet's LabelPooling) differs in three measured ways that this module
reproduces, so a published recipe can be rerun as published, or the fixes measured:

* **Box order.** The crop is passed to ``roi_align`` as ``(y1, x1, y2, x2) * W - 0.5`` while
  ``roi_align`` reads ``(x1, y1, x2, y2)``; the maps are ``[k, rows, cols]``, so the pooled region is
  the crop mirrored about the diagonal (every coordinate scaled by the map's width). The flip comes
  first there: the image and its map are flipped, then the crop is taken from the flipped image.
* **Smoothing.** ``t * (1 - s + s/K) + s/K``: rows sum to ``1 + s/K`` (tl_fast: ``(1 - s) t + s/K``).
* **Label-file key.** A label file is named by its image's name cut at the first ``.``
  (``a.b.JPEG`` -> ``a.pt``); tl_fast's key cuts the last extension. The loader's join accepts both.

Not reproduced: the official code applies RandAugment's geometry to the whole image before the crop
(nearest-neighbour on the map). Under ``label_compat="official"`` RandAugment's affine still follows
the crop as in tl_fast (``official_label_affine`` composes it after the official crop).
"""
from __future__ import annotations

import os

import numpy as np

from . import geometry

LABEL_COMPAT = ("tl_fast", "official")


def check_label_compat(name: str) -> str:
    if name not in LABEL_COMPAT:
        raise ValueError(f"label_compat must be one of {LABEL_COMPAT}; got {name!r}")
    return name


def smoothing_terms(smoothing: float, num_classes: int, rule: str = "tl_fast") -> tuple[float, float]:
    """``(keep, spread)`` with target ``keep * softmax(a) + spread``: tl_fast's ``(1 - s, s/K)``
    (rows sum to 1) or the official ``(1 - s + s/K, s/K)`` (rows sum to ``1 + s/K``)."""
    s, k = float(smoothing), int(num_classes)
    check_label_compat(rule)
    return (1.0 - s + s / k, s / k) if rule == "official" else (1.0 - s, s / k)


def official_smoothing(smoothing: float, num_classes: int) -> tuple[float, float]:
    """``(s', c)`` such that the official smoothing of ``s`` is ``c`` times tl_fast's smoothing of ``s'``:
    ``t (1 - s + s/K) + s/K = c * ((1 - s') t + s'/K)`` with ``c = 1 + s/K``, ``s' = s / c``. Lets any
    tl_fast implementation (the token-target kernels, the fused loss) give the official targets."""
    c = 1.0 + float(smoothing) / int(num_classes)
    return float(smoothing) / c, c


def official_crop_flip_affine(box: np.ndarray, flip: np.ndarray, map_size: tuple[int, int]) -> np.ndarray:
    """``[B, 2, 3]`` float64 affine (normalized output -> source map) of the region the official code
    pools for crop ``box`` ``[B, 4]`` (normalized ``(x1, y1, x2, y2)`` of the unflipped image, as in
    the plan) and ``flip`` ``[B]``, on maps of ``map_size = (H, W)``.

    The official sample flips image and map, crops ``(x1', y1, x2', y2)`` of the flipped image
    (``x1' = 1 - x2``, ``x2' = 1 - x1``) and hands ``roi_align`` ``(y1, x1', y2, x2') * W``: map
    columns ``[y1, y2] * W`` of the flipped map (output ``u``) and rows ``[x1', x2'] * W`` (output
    ``v``). Columns of the flipped map are ``x -> 1 - x`` of the source map's."""
    box = np.asarray(box, dtype=np.float64)
    flip = np.asarray(flip, dtype=bool)
    h, w = map_size
    x1 = np.where(flip, 1.0 - box[:, 2], box[:, 0])  # the crop in the (possibly flipped) image
    x2 = np.where(flip, 1.0 - box[:, 0], box[:, 2])
    y1, y2 = box[:, 1], box[:, 3]
    a = np.zeros((len(box), 2, 3))
    sign = np.where(flip, -1.0, 1.0)
    a[:, 0, 0] = sign * (y2 - y1)  # u runs along the crop's y range, over the map's columns
    a[:, 0, 2] = np.where(flip, 1.0 - y1, y1)
    a[:, 1, 1] = (x2 - x1) * (w / h)  # v runs along the crop's x range, over the map's rows (scaled by W)
    a[:, 1, 2] = x1 * (w / h)
    return a


def official_label_affine(plan, map_size: tuple[int, int]) -> np.ndarray:
    """The labels' affine under ``label_compat="official"`` for a :class:`tl_fast.plan.BatchPlan`:
    the official crop region, then the plan's RandAugment affine (which tl_fast applies after the
    crop, where the official code applies it before; not reproduced)."""
    return geometry.compose(official_crop_flip_affine(plan.box, plan.flip, map_size), plan.ra_affine)


def official_key(rel_path: str) -> str:
    """The official label-file key of an image: its relative path with the file name cut at its
    first ``.`` (``n01/a.b.JPEG`` -> ``n01/a``); tl_fast's :func:`tl_fast.dataset.image_key` cuts
    the last extension (``n01/a.b``)."""
    rel = rel_path.replace(os.sep, "/")
    folder, _, name = rel.rpartition("/")
    stem = name.split(".")[0]
    return f"{folder}/{stem}" if folder else stem
