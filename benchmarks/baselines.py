"""The public token-labeling path (LV-ViT), re-stated faithfully: the benchmarks' baseline and the
tests' oracle for it (not part of the installed package).

Per sample: scatter the top-k scores into a dense float32 ``[K, H, W]`` map, flip it when the
sample is flipped, then ``torchvision.ops.roi_align`` twice (the token grid and one bin for the class
token, ``aligned=False``, ``sampling_ratio=-1``, boxes in map pixels minus 0.5), softmax over
classes, label smoothing and the MixToken mix. Only crop + flip geometry exists on this path.
"""
from __future__ import annotations

import torch
from torchvision.ops import roi_align

from tl_fast.ops.reference import apply_mixtoken


def public_token_targets(
    values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, *,
    num_classes: int, grid=(14, 14), smoothing: float = 0.0, mix_box=None,
) -> torch.Tensor:
    """``[B, 1 + Gh*Gw, K]`` float32 targets for normalized boxes ``[B, 4]`` (x1, y1, x2, y2)."""
    bsz, k, h, w = values.shape
    dense = torch.zeros(bsz, num_classes, h, w, dtype=torch.float32, device=values.device)
    for b in range(bsz):  # the public loader builds each sample's dense map on its own
        dense[b].scatter_(0, indices[b].long(), values[b].float())
        if bool(flip[b]):
            dense[b] = dense[b].flip(-1)
    boxes = boxes.to(torch.float32).clone()
    x1, x2 = boxes[:, 0].clone(), boxes[:, 2].clone()
    fl = torch.as_tensor(flip, dtype=torch.bool, device=boxes.device)
    boxes[:, 0] = torch.where(fl, 1.0 - x2, x1)
    boxes[:, 2] = torch.where(fl, 1.0 - x1, x2)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
    rois = torch.cat([torch.arange(bsz, device=boxes.device, dtype=torch.float32)[:, None], boxes * scale - 0.5], 1)
    kw = dict(spatial_scale=1.0, sampling_ratio=-1, aligned=False)
    tokens = roi_align(dense, rois, output_size=tuple(grid), **kw)  # [B, K, Gh, Gw]
    cls = roi_align(dense, rois, output_size=(1, 1), **kw)  # [B, K, 1, 1]
    scores = torch.cat([cls.flatten(2), tokens.flatten(2)], 2).transpose(1, 2)  # [B, 1+T, K]
    t = scores.softmax(-1)
    if smoothing:
        t = t * (1.0 - smoothing) + smoothing / num_classes
    if mix_box is not None:
        t = apply_mixtoken(t, mix_box, tuple(grid))
    return t
