"""tl_fast: high-throughput data loading for token-labeling training of vision transformers.

The Triton kernels live in the repository's top-level ``kernels/`` folder; ``tl_fast/kernels`` is a
symbolic link to it, so ``tl_fast.kernels`` is an ordinary subpackage both in a checkout
(``PYTHONPATH=.``) and in the wheel, which copies the linked files.
"""

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)


def __getattr__(name: str):
    # Lazy: importing tl_fast must not import torch data loading, DALI or FFCV.
    if name == "TokenLabelLoader":
        from .loaders import TokenLabelLoader

        return TokenLabelLoader
    raise AttributeError(f"module 'tl_fast' has no attribute {name!r}")
