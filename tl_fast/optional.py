"""Optional dependencies: one place that imports them and says how to install a missing one.

DALI, FFCV and matplotlib are extras (``pip install "tl-fast[dali]"`` and so on). Code that needs
one calls :func:`require`; a missing package raises :class:`MissingDependency`, whose message is one
line naming the install command, and which the CLI and the trainer print as an ``error:`` line.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from types import ModuleType

# module to import -> (what needs it, how to install it)
_INSTALL = {
    "nvidia.dali": ("NVIDIA DALI", 'pip install "tl-fast[dali]" (nvidia-dali-cuda130; pick the wheel '
                    "matching your CUDA major version)"),
    "ffcv": ("FFCV", 'apt-get install pkg-config libturbojpeg0-dev libopencv-dev, then pip install "tl-fast[ffcv]"'),
    "matplotlib": ("matplotlib", 'pip install "tl-fast[plot]" (or pip install matplotlib)'),
}


class MissingDependency(ImportError):
    """An optional package is not installed; the message says how to install it."""


def available(module: str) -> bool:
    """Whether ``module`` imports (a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (one of DALI, FFCV, matplotlib) or raise a one-line :class:`MissingDependency`.

    ``purpose`` completes "<purpose> needs <package>", e.g. ``"backend='dali'"``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name, install = _INSTALL[module]
        raise MissingDependency(f"{purpose} needs {name}, which is not installed ({err}): {install}") from err


# Distributions whose internals tl_fast builds on (FFCV's loader, epoch iterator and memory manager),
# with the version tested; another version is refused unless its environment variable is set to 1.
TESTED_VERSIONS = {"ffcv": ("1.0.2", "TL_FAST_ALLOW_UNTESTED_FFCV")}


class UntestedDependency(MissingDependency):
    """An optional package is installed in a version tl_fast was not tested with."""


def require_tested(distribution: str, purpose: str) -> None:
    """Raise a one-line :class:`UntestedDependency` unless ``distribution`` is installed in its tested
    version (:data:`TESTED_VERSIONS`) or its override variable is set to ``1``."""
    tested, override = TESTED_VERSIONS[distribution]
    try:
        found = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        found = "an unknown version (no package metadata)"
    if found == tested or os.environ.get(override) == "1":
        return
    raise UntestedDependency(
        f"{purpose} is tested with {distribution}=={tested} (it builds on {distribution}'s internals) but found "
        f"{found}: pip install {distribution}=={tested}, or set {override}=1 to use this version untested")
