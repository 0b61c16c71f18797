"""tl_fast leaves FFCV and DALI as it found them (issue 27): a plain FFCV loader or DALI pipeline
built before, beside or after a tl_fast loader delivers exactly what it delivers alone, and the
tl_fast loaders deliver what they deliver alone after a plain FFCV loader (which mutates numba's
shared types) was built. Each case runs in a fresh process with a timeout, so a hang fails the
test instead of stopping the suite. The FFCV backend refuses an untested FFCV version."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from test_loader_helpers import make_folder

pytest.importorskip("ffcv")
pytest.importorskip("nvidia.dali")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = tmp_path_factory.mktemp("isolation")
    images = make_folder(root / "images", {"a": 4, "b": 4, "c": 4})
    DatasetWriter(str(root / "plain.beton"), {"image": RGBImageField(write_mode="jpg"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(ImageFolder(images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_ffcv(images, None, str(root / "tl.beton"), num_workers=1, progress=False)
    return root


def _run(mode: str, workdir, timeout: float = 300) -> dict[str, list[np.ndarray]]:
    out = workdir / f"{mode}.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "plain_pipelines.py"), mode, str(workdir), str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout)  # a hang fails here
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        got: dict[str, list[np.ndarray]] = {}
        for name in sorted(z.files, key=lambda n: (n.split("/")[0], int(n.split("/")[1]))):
            got.setdefault(name.split("/")[0], []).append(z[name])
    return got


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) > 0 and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def test_plain_pipelines_before_beside_and_after_tl_fast_loaders_deliver_what_they_deliver_alone(workdir):
    alone, tl_alone, mixed = _run("plain", workdir), _run("tl_fast", workdir), _run("mixed", workdir)
    for lib in ("ffcv", "dali"):
        for when in ("before", "beside", "after"):
            assert _same(mixed[f"{lib}_{when}"], alone[lib]), f"plain {lib} built {when} a tl_fast loader"
        for key in (f"tl_{lib}", f"tl_{lib}_beside"):
            assert _same(mixed[key], tl_alone[key]), f"{key}: tl_fast's loader after a plain FFCV loader"


def test_ffcv_backend_refuses_an_untested_ffcv_version(tmp_path, monkeypatch):
    """Importing the FFCV backend with another FFCV version is a one-line error naming the tested
    version and the override; with the override it imports."""
    fake = tmp_path / "site"
    info = fake / "ffcv-9.9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ffcv\nVersion: 9.9.9\n")
    code = "from tl_fast.cli import main; import sys; sys.exit(main(['pack-ffcv', 'imgs', 'x.beton', '--no-labels']))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), ROOT])}
    env.pop("TL_FAST_ALLOW_UNTESTED_FFCV", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ffcv==1.0.2" in lines[0] and "9.9.9" in lines[0], proc.stderr
    assert "TL_FAST_ALLOW_UNTESTED_FFCV=1" in lines[0] and lines[0].startswith("tl-fast pack-ffcv: error:")

    from tl_fast import optional

    monkeypatch.setattr(optional.importlib.metadata, "version", lambda name: "9.9.9")
    with pytest.raises(optional.UntestedDependency, match="ffcv==1.0.2"):
        optional.require_tested("ffcv", "tl_fast's FFCV backend")
    monkeypatch.setenv("TL_FAST_ALLOW_UNTESTED_FFCV", "1")
    optional.require_tested("ffcv", "tl_fast's FFCV backend")  # the override
