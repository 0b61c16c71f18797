"""Inputs the benchmarks share: annotator-like top-k maps, a crop + flip plan, a MixToken box.
(Timing, the machine and result rows are in :mod:`benchmarks.harness`.)"""
from __future__ import annotations

import numpy as np
import torch

from tl_fast.plan import AugmentConfig, draw_mix_box, plan_batch


def smooth_topk_maps(batch: int, num_classes: int, topk: int, size: int, seed: int = 0):
    """Annotator-like maps: a few object classes per image, spatially smooth logits, top-k kept.

    Returns ``values [B, k, H, W]`` float16 and ``indices [B, k, H, W]`` int16/int32."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, 12, 4, 4, generator=gen) * 3  # 12 candidate classes, coarse layout
    classes = torch.stack([torch.randperm(num_classes, generator=gen)[:12] for _ in range(batch)])
    field = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    field = field + 0.3 * torch.randn(batch, 12, size, size, generator=gen)
    top = field.topk(topk, dim=1)
    values = (top.values + 2.0).half()
    idx = torch.gather(classes[:, :, None, None].expand(-1, -1, size, size), 1, top.indices)
    return values, idx.to(torch.int16 if num_classes <= 32767 else torch.int32)


def crop_flip_plan(batch: int, seed: int = 0):
    """A training plan without RandAugment geometry (what the public path supports)."""
    sizes = np.stack([np.full(batch, 375), np.full(batch, 500)], 1)
    return plan_batch(seed, 0, np.arange(batch), sizes, AugmentConfig(randaugment=None))


def mix_box(grid: tuple[int, int], seed: int = 0) -> tuple[int, int, int, int]:
    return tuple(int(x) for x in draw_mix_box(seed, 0, [0], grid).boxes[0])
