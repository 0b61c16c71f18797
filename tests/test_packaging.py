"""The product as a pip user gets it: a wheel built from this checkout, installed (not editable) into a
fresh virtual environment and used from a folder outside the checkout.

The fresh environment reuses this environment's already-installed dependencies (torch, timm, ...)
through a path entry, so the test costs seconds, not a multi-GB install; ``tl_fast`` itself comes
only from the wheel.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import tl_fast

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # Built from a copy, so that setuptools' build/ folder neither lands in the checkout nor carries
    # files deleted since an earlier build into the wheel. Links are kept (tl_fast/kernels is one).
    src = dist / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs"))
    # No build isolation: the build backend (setuptools) is already here, and the network may not be.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(src)], cwd=dist)
    (whl,) = dist.glob("tl_fast-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(python, bin dir, env, cwd) of a fresh venv holding the wheel, run from outside the checkout."""
    root = tmp_path_factory.mktemp("user")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # A plain path line: this environment's packages become importable, but its .pth files (this
    # checkout's editable install among them) are not run.
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    (purelib / "reuse_test_env.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], cwd=root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = root / "elsewhere"
    work.mkdir()
    return python, env_dir / "bin", env, work


def test_wheel_ships_kernels_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__", "token_targets", "token_label_loss"):
        assert f"tl_fast/kernels/{module}.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names), "the Apache-2.0 text must ship in the wheel"
    # Only the package: no top-level folder of the checkout rides along as tl_fast.* or on its own.
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/", "kernels/",
                                                  "tl_fast/tests/", "tl_fast/benchmarks/"))]


def test_installed_package_comes_from_the_wheel(installed):
    python, _, env, work = installed
    out = _run([python, "-c", "import tl_fast, tl_fast.kernels; print(tl_fast.__file__); "
                "print(tl_fast.kernels.__file__); print(tl_fast.__version__)"], cwd=work, env=env)
    pkg, kernels, version = out.stdout.split()
    assert str(REPO) not in pkg and str(REPO) not in kernels, out.stdout
    assert Path(kernels).parent.parent == Path(pkg).parent
    assert version == tl_fast.__version__


def test_installed_kernels_run_in_the_interpreter(installed):
    python, _, env, work = installed
    code = """
import torch
from tl_fast import ops
from tl_fast.store.synthetic import synthetic_topk_maps
v, i = synthetic_topk_maps(3, num_classes=37, topk=3, map_size=(5, 6), kind="random", seed=1)
v, i = torch.from_numpy(v), torch.from_numpy(i).int()
affine = torch.tensor([[0.6, 0.0, 0.1], [0.0, 0.7, 0.2]]).expand(3, 2, 3).contiguous()
a = ops.token_targets(v, i, affine, num_classes=37, grid=(3, 3), smoothing=0.1, mix_box=(0, 1, 2, 3), impl="triton")
b = ops.token_targets(v, i, affine, num_classes=37, grid=(3, 3), smoothing=0.1, mix_box=(0, 1, 2, 3), impl="torch")
assert a.shape == (3, 10, 37), a.shape
print(float((a - b).abs().max()))
"""
    out = _run([python, "-c", code], cwd=work, env={**env, "TRITON_INTERPRET": "1"})
    assert float(out.stdout.strip()) < 1e-5


def test_installed_command_line(installed):
    _, bindir, env, work = installed
    out = _run([bindir / "tl-fast", "--version"], cwd=work, env=env)
    assert out.stdout.strip() == f"tl-fast {tl_fast.__version__}"
    out = _run([bindir / "tl-fast", "--help"], cwd=work, env=env)
    for command in ("convert-pt", "inspect", "annotate", "pack-ffcv", "demo"):
        assert command in out.stdout
