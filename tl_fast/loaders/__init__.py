"""Token-labeling loaders: one :class:`TokenLabelLoader`, backends ``dali``, ``ffcv`` and ``torch``.

Backends are imported lazily (DALI and FFCV are optional dependencies)."""
from .batch import Batch, LoaderConfig
from .loader import BACKENDS, TokenLabelLoader

__all__ = ["TokenLabelLoader", "Batch", "LoaderConfig", "BACKENDS"]
