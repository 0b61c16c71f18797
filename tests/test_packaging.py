"""The product as a pip user gets it: a wheel built from this checkout, installed (not editable) into a
fresh virtual environment and used from a folder outside the checkout.

The fresh environment reuses this environment's already-installed dependencies (torch, timm, ...)
through a path entry, so the test costs seconds, not a multi-GB install; ``tl_fast`` itself comes
only from the wheel.
"""
from __future__ import annotations

import json
import math
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
    # files deleted since an earlier build into the wheel.
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
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "tools/", "experiments/", "examples/",
                                                  "kernels/", "tl_fast/tests/", "tl_fast/benchmarks/"))]


def test_wheel_leaves_out_test_and_benchmark_helpers(wheel):
    """The public path's re-statement and the synthetic maps serve tests and benchmarks only: they live in
    benchmarks/ (benchmarks.baselines, benchmarks.synthetic), not in the installed package."""
    names = zipfile.ZipFile(wheel).namelist()
    assert "tl_fast/ops/reference.py" in names and "tl_fast/store/reader.py" in names
    for gone in ("tl_fast/ops/public.py", "tl_fast/store/synthetic.py", "benchmarks/baselines.py",
                 "benchmarks/synthetic.py"):
        assert gone not in names
    assert not [n for n in names if n.endswith(".py") and not n.startswith("tl_fast/")]


def test_installed_package_has_no_test_helpers(installed):
    python, _, env, work = installed
    out = _run([python, "-c", "import importlib.util as u; print([m for m in ('tl_fast.ops.public', "
                "'tl_fast.store.synthetic', 'benchmarks') if u.find_spec(m) is not None])"], cwd=work, env=env)
    assert out.stdout.strip() == "[]", out.stdout


def test_checkout_has_no_symbolic_links():
    """The kernels are real files inside the package: links break on some filesystems and archivers."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    listing = _run(["git", "ls-files", "-s"], cwd=REPO).stdout.splitlines()
    assert not [line for line in listing if line.startswith("120000")]


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
g = torch.Generator().manual_seed(1)
v, i = torch.randn(3, 37, 5, 6, generator=g).softmax(1).topk(3, dim=1)
v, i = v.half(), i.int()
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


def _tiny_dataset(root: Path) -> Path:
    """Two classes of small JPEGs (train and val) and a label store of 4x4 top-2 maps for train."""
    import numpy as np
    from PIL import Image

    from tl_fast.store import StoreWriter

    rng = np.random.default_rng(0)
    keys = []
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(root / split / c / f"{i}.jpg")
                keys.append(f"{c}/{i}") if split == "train" else None
    with StoreWriter(root / "labels.tlstore", num_classes=2, topk=2, map_size=(4, 4)) as w:
        for key in keys:
            values = np.sort(rng.random((2, 4, 4)), axis=0)[::-1].astype(np.float16)
            w.add(key, values, np.stack([np.zeros((4, 4), np.int64), np.ones((4, 4), np.int64)]))
    return root


def test_installed_trainer_runs_two_steps(installed):
    """``tl-fast train`` from the wheel: two steps of LV-ViT with token labels, a resumable checkpoint,
    the log and the curves; ``python -m tl_fast.train`` is the same trainer."""
    python, bindir, env, work = installed
    data = _tiny_dataset(work / "data")
    out = _run([bindir / "tl-fast", "train", "--data", str(data), "--model", "lvvit_demo", "--img-size", "32",
                "--batch-size", "4", "--epochs", "1", "--max-steps", "2", "--workers", "0", "--device", "cpu",
                "--aa", "none", "--reprob", "0", "--log-every", "1", "--output", str(work / "run"), "--no-progress"],
               cwd=work, env=env)
    assert "token labels" in out.stdout and "log:" in out.stdout
    for name in ("last.pth", "log.jsonl"):
        assert (work / "run" / name).is_file(), out.stdout
    events = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), events
    assert events[-1]["event"] == "end" and events[-1]["global_step"] == 2
    out = _run([python, "-m", "tl_fast.train", "--help"], cwd=work, env=env)
    assert "--loader" in out.stdout and "--model" in out.stdout
