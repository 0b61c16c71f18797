"""Optional dependencies: a missing one is a one-line error naming the install command, in the library
and on the command line; ``backend="auto"`` picks what is installed."""
from __future__ import annotations

import sys

import pytest

from tl_fast import cli
from tl_fast.loaders.loader import resolve_backend
from tl_fast.optional import MissingDependency, available, require


@pytest.fixture
def without(monkeypatch):
    """Make ``import NAME`` (and its submodules) fail as if NAME were not installed."""

    def hide(name: str) -> None:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: ImportError on import

    return hide


@pytest.mark.parametrize("module, install", [("ffcv", "tl-fast[ffcv]"), ("nvidia.dali", "tl-fast[dali]"),
                                             ("matplotlib", "tl-fast[plot]")])
def test_missing_dependency_is_one_line_with_the_install_command(without, module, install):
    without(module)
    assert not available(module)
    with pytest.raises(MissingDependency) as err:
        require(module, "this feature")
    message = str(err.value)
    assert "\n" not in message and install in message and message.startswith("this feature needs ")
    assert isinstance(err.value, ImportError)


def test_pack_ffcv_without_ffcv_is_an_error_line(without, monkeypatch, tmp_path, capsys):
    without("ffcv")
    monkeypatch.delitem(sys.modules, "tl_fast.loaders.ffcv", raising=False)  # restored afterwards
    (tmp_path / "a").mkdir()
    rc = cli.main(["pack-ffcv", str(tmp_path), str(tmp_path / "x.beton"), "--no-labels"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tl-fast pack-ffcv: error: ") and "tl-fast[ffcv]" in err[0]


def test_auto_backend_picks_what_is_installed(without, tmp_path):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    assert resolve_backend("auto", beton) == "ffcv"
    assert resolve_backend("auto", tmp_path) == ("dali" if available("nvidia.dali") else "torch")
    without("nvidia.dali")
    assert resolve_backend("auto", tmp_path) == "torch"
    assert resolve_backend("torch", tmp_path) == "torch"
    with pytest.raises(ValueError, match="'auto' or one of"):
        resolve_backend("tf.data", tmp_path)
