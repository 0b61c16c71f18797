"""tl_fast: high-throughput data loading for token-labeling training of vision transformers.

The host side is this package; the Triton kernels (device side) are its subpackage
``tl_fast.kernels``, imported lazily by ``tl_fast.ops``.
"""

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)


def __getattr__(name: str):
    # Lazy: importing tl_fast must not import torch data loading, DALI or FFCV.
    if name == "TokenLabelLoader":
        from .loaders import TokenLabelLoader

        return TokenLabelLoader
    raise AttributeError(f"module 'tl_fast' has no attribute {name!r}")
