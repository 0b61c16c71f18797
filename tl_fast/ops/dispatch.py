"""Which implementation of an op runs: one rule for the token ops and the class-token-only ops.

``impl`` names it the same way for every op in :mod:`tl_fast.ops`:

* ``"auto"``: the Triton kernels for CUDA tensors (the PyTorch reference when Triton does not import),
  the numba path (:mod:`tl_fast.ops.cpu`) for CPU tensors, the reference on any other device;
* ``"triton"``: the kernels; on CPU tensors they need Triton's interpreter (``TRITON_INTERPRET=1``
  set before ``tl_fast.kernels`` is first imported);
* ``"cpu"``: the numba path, CPU tensors only;
* ``"torch"``: the PyTorch reference (:mod:`tl_fast.ops.reference`, the oracle the others are tested
  against), on any device.
"""
from __future__ import annotations

import os
from typing import Any

import torch

IMPLS = ("auto", "triton", "torch", "cpu")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_impl(impl: str, device: torch.device) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"``: what ``impl`` runs for tensors on ``device``; raises
    when the forced implementation cannot run there."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            return "triton" if _triton_imports() else "torch"
        return "cpu" if device.type == "cpu" else "torch"
    if impl == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"impl='triton' on {device} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "tl_fast.kernels is imported, or use impl='auto' / 'torch' (the PyTorch reference)")
    if impl == "cpu" and device.type != "cpu":
        raise RuntimeError(f"impl='cpu' needs CPU tensors, got {device}; use impl='auto' or 'triton'")
    return impl


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


def check_loaded_kernels(device: torch.device) -> None:
    """:func:`check_kernel_mode` for ``tl_fast.kernels`` as this process imported it (all its kernels
    were decorated in the same mode)."""
    from ..kernels import token_targets as tt

    check_kernel_mode(device, tt.token_tile_kernel)


def maps_tensors(maps: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of a ``TopKMaps`` or a ``(values, indices)`` pair."""
    if hasattr(maps, "values") and hasattr(maps, "indices") and not callable(maps.values):
        return maps.values, maps.indices
    if isinstance(maps, (tuple, list)) and len(maps) == 2:
        return maps[0], maps[1]
    raise TypeError("maps must be a TopKMaps (values, indices) or a (values, indices) pair")


__all__ = ["IMPLS", "choose_impl", "check_kernel_mode", "check_loaded_kernels", "maps_tensors"]
