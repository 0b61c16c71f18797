"""The device step: a backend's uint8 crops -> RandAugment, normalization and erasing, by the plan."""
from __future__ import annotations

import numpy as np
import torch

from ..plan import BatchPlan
from .erase import random_erase
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from .photometric import GEOMETRIC_IDS, apply_photometric
from .warp import warp, warp_uint8_cv2


def augment_batch(
    images: torch.Tensor, plan: BatchPlan, *, normalize_output: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
) -> torch.Tensor:
    """Finish a batch: uint8 ``[B, 3, S, S]`` (on the target device) -> float32 normalized images.

    Applies the plan's RandAugment warp and photometric operations, normalizes, and erases the
    plan's boxes (``plan.erase``; none when it is None). It draws nothing: every parameter comes
    from the plan. With ``normalize_output=False`` the images are already normalized floats (a
    backend normalized them) and only erasing runs."""
    if normalize_output:
        geo = np.isin(plan.ra_op, GEOMETRIC_IDS).any(1) if plan.ra_op.size else np.zeros(len(images), bool)
        sel = np.flatnonzero(geo)
        x = None
        if images.device.type == "cpu" and images.dtype == torch.uint8:
            # CPU: OpenCV's uint8 warp, then the photometric operations and normalization as tables.
            from .tables import augment_photometric_normalize

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
    if plan.erase is not None:
        x = random_erase(x, plan.erase, plan.noise_seed)
    return x
