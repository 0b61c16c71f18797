"""tl_fast: high-throughput data loading for token-labeling training of vision transformers."""
import os as _os

__version__ = "0.1.0"

# In an installed wheel the top-level kernels/ folder is the subpackage tl_fast.kernels (see
# pyproject.toml). Run from a source checkout (PYTHONPATH=.), make the same import work.
_src_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_src_kernels, "__init__.py")
):
    __path__.append(_os.path.dirname(_src_kernels))  # type: ignore[name-defined]


def __getattr__(name: str):
    # Lazy: importing tl_fast must not import torch data loading, DALI or FFCV.
    if name == "TokenLabelLoader":
        from .loaders import TokenLabelLoader

        return TokenLabelLoader
    raise AttributeError(f"module 'tl_fast' has no attribute {name!r}")
