"""Triton kernels for token labeling, shipped as ``tl_fast.kernels``.

* :mod:`tl_fast.kernels.token_targets` — ``[B, 1 + Gh*Gw, K]`` token targets from compressed top-k
  maps, affines and MixToken boxes in one persistent launch (the row machinery is shared).
* :mod:`tl_fast.kernels.token_label_loss` — the fused token-labeling loss (forward + backward)
  that never materializes the targets.

Import these modules only when a kernel is needed (``tl_fast.ops`` does so lazily): importing them
imports Triton, and decides whether the kernels are compiled or interpreted
(``TRITON_INTERPRET=1``, CPU tensors).
"""
