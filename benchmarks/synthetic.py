"""Synthetic top-k score maps for tests and benchmarks (no annotator needed; not part of the installed
package).

Three kinds, from easy to hard for the codec:

* ``"smooth"`` (annotator-like): a weak, smooth logit field over all K classes plus a dozen
  "present" classes (the object and its look-alikes) with strong, smooth fields, plus per-position
  noise; softmax; top-k. Like a real annotator, the top classes come from a small set.
* ``"field"``: a small random logit field over all K classes (3 x 3, std 3) upsampled to the map size,
  plus per-position noise (std 0.5); softmax; top-k. Top-5 sets turn over quickly: a hard case.
* ``"random"``: no spatial structure at all (i.i.d. logits per position).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("smooth", "field", "random")


def _chunk(g: torch.Generator, n: int, num_classes: int, topk: int, h: int, w: int, kind: str):
    if kind == "smooth":
        logits = torch.randn(n, num_classes, 2, 2, generator=g)
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        present = min(12, num_classes)
        cls = torch.stack([torch.randperm(num_classes, generator=g)[:present] for _ in range(n)])
        strong = torch.randn(n, present, 3, 3, generator=g) * 4.0 + 4.0
        strong = F.interpolate(strong, size=(h, w), mode="bilinear", align_corners=False)
        logits.scatter_add_(1, cls[:, :, None, None].expand(n, present, h, w), strong)
        logits += 0.3 * torch.randn(n, num_classes, h, w, generator=g)
    elif kind == "field":
        logits = torch.randn(n, num_classes, 3, 3, generator=g) * 3.0
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        logits += 0.5 * torch.randn(n, num_classes, h, w, generator=g)
    elif kind == "random":
        logits = torch.randn(n, num_classes, h, w, generator=g) * 2.0
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    values, indices = logits.softmax(1).topk(topk, dim=1)
    return values.half().numpy(), indices.numpy()


def synthetic_topk_maps(n: int, *, num_classes: int = 1000, topk: int = 5, map_size: Sequence[int] = (18, 18),
                        kind: str = "smooth", seed: int = 0, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` maps: values float16 ``[n, k, H, W]`` (softmax scores, descending) and indices int64."""
    if topk > num_classes:
        raise ValueError(f"topk ({topk}) exceeds num_classes ({num_classes})")
    h, w = int(map_size[0]), int(map_size[1])
    g = torch.Generator().manual_seed(seed)
    values = np.empty((n, topk, h, w), np.float16)
    indices = np.empty((n, topk, h, w), np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        values[start:stop], indices[start:stop] = _chunk(g, stop - start, num_classes, topk, h, w, kind)
    return values, indices


__all__ = ["KINDS", "synthetic_topk_maps"]
