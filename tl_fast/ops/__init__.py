"""Token-label ops with one signature and three implementations (docs/spec.md section 4).

``impl="auto"`` runs the Triton kernels (``tl_fast.kernels``) for CUDA tensors and the numba CPU path
(:mod:`tl_fast.ops.cpu`) for CPU tensors; ``impl="triton"`` forces the kernels (on CPU tensors they
need Triton's interpreter: ``TRITON_INTERPRET=1`` set before ``tl_fast.kernels`` is first imported);
``impl="cpu"`` forces the numba path (CPU tensors only); ``impl="torch"`` forces the PyTorch reference
(:mod:`tl_fast.ops.reference`, the oracle the other two are tested against). Triton is imported
lazily, so importing this module never needs a GPU or a working Triton install.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from . import reference

_IMPLS = ("auto", "triton", "torch", "cpu")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _use_triton(impl: str, device: torch.device) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}; got {impl!r}")
    if impl in ("torch", "cpu"):
        return False
    if impl == "auto":
        if device.type != "cuda":
            return False
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"impl='triton' on {device} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "tl_fast.kernels is imported, or use impl='auto' / 'torch' (the PyTorch reference)")
    return True


def _use_cpu_path(impl: str, device: torch.device) -> bool:
    """Whether the numba CPU path (:mod:`tl_fast.ops.cpu`) computes the targets; call after _use_triton."""
    if impl == "cpu" and device.type != "cpu":
        raise RuntimeError(f"impl='cpu' needs CPU tensors, got {device}; use impl='auto' or 'triton'")
    return impl == "cpu" or (impl == "auto" and device.type == "cpu")


def _targets_fallback(impl: str, device: torch.device):
    """The non-Triton token-targets function for ``impl`` on ``device``."""
    if _use_cpu_path(impl, device):
        from . import cpu

        return cpu.token_targets
    return reference.token_targets


def check_kernel_mode(device: torch.device, kernel: Any) -> None:
    """Raise unless the ``@triton.jit`` function ``kernel`` suits tensors on ``device``: compiled for CUDA,
    interpreted (decorated under ``TRITON_INTERPRET=1``) for CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel, InterpretedFunction)
    if device.type == "cuda" and interpreted:
        raise RuntimeError("tl_fast.kernels was imported with TRITON_INTERPRET=1; CUDA tensors need compiled "
                           "kernels (unset TRITON_INTERPRET before importing tl_fast)")
    if device.type != "cuda" and not interpreted:
        raise RuntimeError("tl_fast.kernels was imported without TRITON_INTERPRET=1, so its kernels cannot run on "
                           f"{device} tensors; set TRITON_INTERPRET=1 before the first import of tl_fast.kernels")


def _check_kernel_mode(device: torch.device) -> None:
    from ..kernels import token_targets as tt

    check_kernel_mode(device, tt.token_tile_kernel)


def _maps_tensors(maps: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(maps, "values") and hasattr(maps, "indices") and not callable(maps.values):
        return maps.values, maps.indices
    if isinstance(maps, (tuple, list)) and len(maps) == 2:
        return maps[0], maps[1]
    raise TypeError("maps must be a TopKMaps (values, indices) or a (values, indices) pair")


def token_targets(
    values: torch.Tensor, indices: torch.Tensor, affine: torch.Tensor, *, num_classes: int,
    grid: Sequence[int] = (14, 14), smoothing: float = 0.0, mix_box=None,
    out_dtype: torch.dtype = torch.float32, impl: str = "auto",
) -> torch.Tensor:
    """Token targets ``[B, 1 + Gh*Gw, K]`` from top-k maps and per-sample affines (docs/spec.md section 3).

    values [B, k, H, W] float16; indices [B, k, H, W] int16/int32; affine [B, 2, 3] normalized output ->
    source; mix_box None, ``(r1, c1, r2, c2)`` for the batch or ``[B, 4]`` per sample."""
    if _use_triton(impl, values.device):
        _check_kernel_mode(values.device)
        from ..kernels.token_targets import token_targets as triton_targets

        return triton_targets(values, indices, affine.to(values.device), num_classes=num_classes, grid=grid,
                              smoothing=smoothing, mix_box=mix_box, out_dtype=out_dtype)
    targets_fn = _targets_fallback(impl, values.device)
    return targets_fn(values, indices, affine.to(values.device), num_classes=num_classes, grid=grid,
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
    values, indices = _maps_tensors(maps)
    num_classes = cls_logits.shape[-1] if num_classes is None else int(num_classes)
    if grid is None:
        if token_logits.dim() == 4:
            grid = (token_logits.shape[1], token_logits.shape[2])
        else:
            side = int(round(token_logits.shape[1] ** 0.5))
            if side * side != token_logits.shape[1]:
                raise ValueError(f"{token_logits.shape[1]} tokens is not a square grid; pass grid=(Gh, Gw)")
            grid = (side, side)
    if _use_triton(impl, cls_logits.device):
        _check_kernel_mode(cls_logits.device)
        from ..kernels.token_label_loss import token_label_loss as fused_loss

        return fused_loss(cls_logits, token_logits, values, indices, affine.to(values.device),
                          num_classes=num_classes, grid=grid, smoothing=smoothing, mix_box=mix_box,
                          cls_weight=cls_weight, dense_weight=dense_weight)
    targets_fn = _targets_fallback(impl, values.device)
    targets = targets_fn(values, indices, affine.to(values.device), num_classes=num_classes, grid=grid,
                         smoothing=smoothing, mix_box=mix_box)
    return reference.token_label_loss(cls_logits, token_logits, targets, cls_weight=cls_weight,
                                      dense_weight=dense_weight)


from .class_only import class_targets, class_token_loss  # noqa: E402  (the class-token-only mode)

__all__ = ["token_targets", "token_label_loss", "class_targets", "class_token_loss", "reference"]
