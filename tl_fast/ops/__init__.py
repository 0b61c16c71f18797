"""Token-label ops with one signature and three implementations (docs/spec.md section 4).

The token ops (:func:`token_targets`, :func:`token_label_loss`) and the class-token-only ops
(:func:`class_targets`, :func:`class_token_loss`) choose their implementation by one rule
(:func:`tl_fast.ops.dispatch.choose_impl`): ``impl="auto"`` runs the Triton kernels (``tl_fast.kernels``)
for CUDA tensors and the numba CPU path (:mod:`tl_fast.ops.cpu`) for CPU tensors; ``impl="triton"``
forces the kernels (on CPU tensors they need Triton's interpreter: ``TRITON_INTERPRET=1`` set before
``tl_fast.kernels`` is first imported); ``impl="cpu"`` forces the numba path (CPU tensors only);
``impl="torch"`` forces the PyTorch reference (:mod:`tl_fast.ops.reference`, the oracle the other two
are tested against). Triton is imported lazily, so importing this module never needs a GPU or a working
Triton install.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import reference
from .dispatch import check_kernel_mode, check_loaded_kernels, choose_impl, maps_tensors


def _targets_fn(which: str):
    """The token-targets function of implementation ``which`` (from :func:`choose_impl`)."""
    if which == "triton":
        from ..kernels.token_targets import token_targets as triton_targets

        return triton_targets
    if which == "cpu":
        from . import cpu

        return cpu.token_targets
    return reference.token_targets


def token_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32, impl: str = "auto",
) -> torch.Tensor:
    """Token targets ``[B, 1 + Gh*Gw, K]`` from top-k maps and per-sample affines (docs/spec.md section 3).

    values [B, k, H, W] float16; indices [B, k, H, W] int16/int32; affine [B, 2, 3] normalized output ->
    source; mix_box None, ``(r1, c1, r2, c2)`` for the batch or ``[B, 4]`` per sample."""
    which = choose_impl(impl, values.device)
    if which == "triton":
        check_loaded_kernels(values.device)
    return _targets_fn(which)(values, indices, affine.to(values.device), num_classes=num_classes, grid=grid,
                              smoothing=smoothing, mix_box=mix_box, out_dtype=out_dtype)


def token_label_loss(
    cls_logits: torch.Tensor, token_logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
    maps: Any = None, affine: Optional[torch.Tensor] = None, mix_box=None, num_classes: Optional[int] = None,
    grid: Optional[Sequence[int]] = None, smoothing: float = 0.0, cls_weight: float = 1.0,
    dense_weight: float = 1.0, impl: str = "auto",
) -> torch.Tensor:
    """``cls_weight * CE(cls) + dense_weight * mean over tokens CE(tokens)`` with soft targets.

    Give either ``targets [B, 1 + T, K]`` (plain soft-target loss) or ``maps`` (TopKMaps or a
    ``(values, indices)`` pair) + ``affine`` (+ ``mix_box``): then the loss is computed from the
    compressed maps — by the fused Triton kernel, which never materializes the targets, or by the
    targets of the CPU path (or the reference, ``impl="torch"``) followed by the plain loss."""
    if targets is not None:
        if maps is not None:
            raise ValueError("give either targets or maps + affine, not both")
        return reference.token_label_loss(cls_logits, token_logits, targets, cls_weight=cls_weight,
                                          dense_weight=dense_weight)
    if maps is None or affine is None:
        raise ValueError("token_label_loss needs targets, or maps and affine")
    values, indices = maps_tensors(maps)
    num_classes = cls_logits.shape[-1] if num_classes is None else int(num_classes)
    if grid is None:
        if token_logits.dim() == 4:
            grid = (token_logits.shape[1], token_logits.shape[2])
        else:
            side = int(round(token_logits.shape[1] ** 0.5))
            if side * side != token_logits.shape[1]:
                raise ValueError(f"{token_logits.shape[1]} tokens is not a square grid; pass grid=(Gh, Gw)")
            grid = (side, side)
    which = choose_impl(impl, cls_logits.device)
    if which == "triton":
        check_loaded_kernels(cls_logits.device)
        from ..kernels.token_label_loss import token_label_loss as fused_loss

        return fused_loss(cls_logits, token_logits, values, indices, affine.to(values.device),
                          num_classes=num_classes, grid=grid, smoothing=smoothing, mix_box=mix_box,
                          cls_weight=cls_weight, dense_weight=dense_weight)
    targets = _targets_fn(choose_impl(impl, values.device))(
        values, indices, affine.to(values.device), num_classes=num_classes, grid=grid, smoothing=smoothing,
        mix_box=mix_box)
    return reference.token_label_loss(cls_logits, token_logits, targets, cls_weight=cls_weight,
                                      dense_weight=dense_weight)


from .class_only import class_targets, class_token_loss  # noqa: E402  (the class-token-only mode)

__all__ = ["token_targets", "token_label_loss", "class_targets", "class_token_loss", "reference", "choose_impl",
           "check_kernel_mode"]
