"""The static properties the kernels' design relies on, from tools/kernel_report.py.

Every kernel specialization the library launches at the benchmark size is compiled for sm_90 with
Triton's bundled ptxas (no GPU needed), in a subprocess without TRITON_INTERPRET. Asserted: no
register spills anywhere, and 128-bit global stores in the dense row writes (the targets' constant
fill, the class rows, the loss gradient) whenever K is a multiple of the 16-byte vector width.
Properties, not timings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE_WRITERS = {"token_tile_kernel", "class_rows_kernel", "loss_bwd_kernel"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tools.kernel_report", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_kernel_is_reported(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"class_rows_kernel", "token_tile_kernel", "token_long_rows_kernel", "loss_token_fwd_kernel",
            "loss_long_fwd_kernel", "loss_bwd_kernel", "loss_long_bwd_kernel"} <= kernels


def test_no_spills(rows):
    spilling = [(r["case"], r["kernel"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spilling, spilling


def test_dense_writes_are_128_bit_when_k_allows(rows):
    for r in rows:
        if r["kernel"] not in DENSE_WRITERS:
            continue
        if r["vec_bytes"] == 16:
            assert r["vector_stores"] > 0, (r["case"], r["kernel"])
        if r["vec"] == 1:
            assert r["vector_stores"] == 0, (r["case"], r["kernel"])  # odd K: scalar stores, still correct
