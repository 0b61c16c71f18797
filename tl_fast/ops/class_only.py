"""The class-token-only ops: targets ``[B, K]`` and their loss for models without token outputs.

The class target of token labeling alone (ReLabel's LabelPooling, the official
``--token-label-size 1``): the crop pooled into one RoI-Align bin, soft-maxed, smoothed, and mixed by
the MixToken box's area when one is drawn. Nothing here builds ``[B, 1 + Gh*Gw, K]``. ``impl`` chooses
the implementation as for the token ops (:func:`tl_fast.ops.dispatch.choose_impl`): on CUDA tensors the
targets kernel's class-row path (``tl_fast/kernels/token_targets.py``, writing only ``[B, K]``), on CPU
tensors the numba path (:func:`tl_fast.ops.cpu.class_targets`), or the PyTorch reference; the loss is
the soft-target cross-entropy of those ``[B, K]`` targets.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import reference
from .dispatch import check_loaded_kernels, choose_impl, maps_tensors


def _targets(which: str, values, indices, affine, **kw) -> torch.Tensor:
    """``[B, K]`` class targets by implementation ``which`` (from :func:`choose_impl`)."""
    if which == "triton":
        return _triton_class_targets(values, indices, affine, **kw)
    if which == "cpu":
        from . import cpu

        return cpu.class_targets(values, indices, affine, **kw)
    return reference.class_targets(values, indices, affine, **kw)


def _triton_class_targets(values, indices, affine, *, num_classes: int, smoothing: float, mix_box, grid,
                          out_dtype: torch.dtype, smoothing_rule: str) -> torch.Tensor:
    """The class rows from the targets kernel (compiled for CUDA, interpreted for CPU tensors); the
    official smoothing is the tl_fast one at another strength, scaled (:func:`tl_fast.compat.official_smoothing`)."""
    from ..compat import official_smoothing
    from ..kernels import token_targets as kernel

    check_loaded_kernels(values.device)
    scale = 1.0
    if smoothing_rule == "official":
        smoothing, scale = official_smoothing(smoothing, num_classes)
    out = kernel.class_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=smoothing,
                               mix_box=mix_box, out_dtype=out_dtype if scale == 1.0 else torch.float32)
    return out if scale == 1.0 else (out * scale).to(out_dtype)


def class_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    smoothing: float = 0.0, mix_box=None, grid: Sequence[int] = (14, 14), out_dtype: torch.dtype = torch.float32,
    smoothing_rule: str = "tl_fast", impl: str = "auto",
) -> torch.Tensor:
    """Class-token targets ``[B, K]``: row 0 of :func:`tl_fast.ops.token_targets`, alone.

    values [B, k, H, W]; indices [B, k, H, W]; affine [B, 2, 3] normalized output -> source;
    mix_box None, ``(r1, c1, r2, c2)`` or ``[B, 4]`` in token units of ``grid`` (``grid`` matters
    only for the box's area: ``lam = 1 - area / (Gh * Gw)``); ``smoothing_rule`` ``"tl_fast"``
    (``(1 - s) t + s/K``) or ``"official"`` (``t (1 - s + s/K) + s/K``, :mod:`tl_fast.compat`)."""
    return _targets(choose_impl(impl, values.device), values, indices, affine.to(values.device),
                    num_classes=num_classes, smoothing=smoothing, mix_box=mix_box, grid=grid, out_dtype=out_dtype,
                    smoothing_rule=smoothing_rule)


def class_token_loss(
    logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *, maps: Any = None,
    affine: Optional[torch.Tensor] = None, mix_box=None, num_classes: Optional[int] = None,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, smoothing_rule: str = "tl_fast", impl: str = "auto",
) -> torch.Tensor:
    """Batch mean of the soft-target cross-entropy ``-sum_c t_c log softmax(z)_c`` of ``logits [B, K]``.

    Give either ``targets [B, K]`` or ``maps`` (``TopKMaps`` or ``(values, indices)``) + ``affine``
    (+ ``mix_box``, ``smoothing``): then the ``[B, K]`` targets are computed from the compressed maps
    (by the implementation ``impl`` chooses) and nothing larger is built."""
    if targets is not None:
        if maps is not None:
            raise ValueError("give either targets or maps + affine, not both")
        return reference.class_token_loss(logits, targets)
    if maps is None or affine is None:
        raise ValueError("class_token_loss needs targets, or maps and affine")
    values, indices = maps_tensors(maps)
    num_classes = logits.shape[-1] if num_classes is None else int(num_classes)
    targets = _targets(choose_impl(impl, logits.device), values, indices, affine.to(values.device),
                       num_classes=num_classes, smoothing=smoothing, mix_box=mix_box, grid=grid,
                       out_dtype=torch.float32, smoothing_rule=smoothing_rule)
    return reference.class_token_loss(logits, targets)


__all__ = ["class_targets", "class_token_loss"]
