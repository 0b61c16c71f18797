"""Triton kernels for token labeling, shipped as ``tl_fast.kernels``.

* :mod:`tl_fast.kernels.token_targets` — ``[B, 1 + Gh*Gw, K]`` token targets from compressed top-k
  maps, affines and MixToken boxes: class rows split over programs, token rows in per-sample tiles.
* :mod:`tl_fast.kernels.token_label_loss` — the fused token-labeling loss (forward + backward)
  that never materializes the targets.
* :mod:`tl_fast.kernels._rows` — the device helpers both share (geometry, sparse lanes, row stats).

Import these modules only when a kernel is needed (``tl_fast.ops`` does so lazily): importing them
imports Triton, and decides whether the kernels are compiled or interpreted
(``TRITON_INTERPRET=1``, CPU tensors).
"""
