"""Triton kernels for token labeling, shipped as ``tl_fast.kernels``."""
