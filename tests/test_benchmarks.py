"""The benchmarks as a package and their results as data: rows are merged by claim and machine,
every row names a claim of benchmarks/targets.py, the claims follow docs/spec.md section 5, and
BENCHMARKS.md is exactly what the rows give (tools/render_benchmarks.py --check)."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.targets import TARGETS
from tools import render_benchmarks

REPO = Path(__file__).resolve().parents[1]
PRODUCT = sorted({b for t in TARGETS.values() for b in t.benchmarks})


def _stamped(claim: str, machine: str, value: float, target: str = "label-store") -> dict:
    r = harness.row(claim, "", value, "ms", target=target)
    return {**r, "command": "python -m benchmarks.x", "machine": {"name": machine}, "commit": "abc", "date": "d"}


def test_a_new_row_replaces_the_same_claim_on_the_same_machine_only(tmp_path):
    harness.write_rows("x", [_stamped("a", "m1", 1.0), _stamped("a", "m2", 2.0), _stamped("b", "m1", 3.0)], tmp_path)
    harness.write_rows("x", [_stamped("a", "m1", 10.0), _stamped("c", "m1", 4.0)], tmp_path)
    rows = {(r["claim"], r["machine"]["name"]): r["value"] for r in harness.read_rows(tmp_path / "x.json")}
    assert rows == {("a", "m1"): 10.0, ("a", "m2"): 2.0, ("b", "m1"): 3.0, ("c", "m1"): 4.0}
    assert not list(tmp_path.glob(".x.*"))  # written atomically, no leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask  # a data file, not a private temp file


def test_rows_name_a_known_target_and_their_run(tmp_path):
    with pytest.raises(ValueError, match="unknown target"):
        harness.write_rows("x", [_stamped("a", "m", 1.0, target="nowhere")], tmp_path)
    bare = harness.row("a", "", 1.0, "ms", target="label-store")
    with pytest.raises(ValueError, match="lacks"):
        harness.write_rows("x", [bare], tmp_path)


def test_record_stamps_the_run(tmp_path):
    import argparse

    args = argparse.Namespace(results_dir=str(tmp_path), no_record=False)
    rows = [harness.row("gather", "N=8", 123456.0, "maps/s", target="label-store", spread_of={"p20": 1.0, "p80": 2.0},
                        baseline="public", baseline_value=1000.0, ratio=123.456, ratio_of="value / baseline",
                        goal=">= 200,000 maps/s", meets=False, load=float("nan"))]
    harness.record("store_throughput", rows, args, ["--n", "8", "--note", "a b"])
    (r,) = harness.read_rows(tmp_path / "store_throughput.json")
    assert r["command"] == "python -m benchmarks.store_throughput --n 8 --note 'a b'"
    assert r["machine"]["cores"] >= 1 and r["machine"]["torch_threads"] >= 1 and r["machine"]["cpu"]
    assert r["versions"]["torch"] and len(r["commit"]) >= 7 and r["date"].endswith("UTC")
    assert r["details"] == {"load": None} and r["meets"] is False and r["ratio"] == pytest.approx(123.456)
    harness.record("store_throughput", rows, argparse.Namespace(results_dir=str(tmp_path / "no"), no_record=True), [])
    assert not (tmp_path / "no").exists()


def test_timing_interleaves_after_warmup():
    calls = []
    timed = harness.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert len(timed["a"].seconds) == 3 and len(timed["b"].cpu_seconds) == 3
    s = harness.spread([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["p20"] < s["median"] < s["p80"]


def test_benchmarks_are_a_package_without_path_edits():
    """Every module imports as ``benchmarks.<name>`` (``python -m benchmarks.<name>``), none edits sys.path
    or imports a sibling as a top-level module, and no test imports an experiment."""
    modules = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__")
    siblings = set(modules)
    for name in modules:
        tree = ast.parse((REPO / "benchmarks" / f"{name}.py").read_text())
        assert "sys.path" not in ast.unparse(tree), f"benchmarks/{name}.py edits sys.path"
        bad = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module in siblings]
        bad += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name in siblings]
        assert not bad, f"benchmarks/{name}.py imports {bad} as top-level modules: use benchmarks.<name>"
    code = "import importlib; [importlib.import_module('benchmarks.' + m) for m in %r]" % modules
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)
    for test in (REPO / "tests").glob("*.py"):
        tree = ast.parse(test.read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        paths = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not [m for m in imported if m.split(".")[0] == "experiments"], test
        assert not [v for v in paths if re.search(r"experiments/\w+\.py", v)], test  # nor loads one by path


def test_every_product_benchmark_records_rows():
    for name in PRODUCT:
        source = (REPO / "benchmarks" / f"{name}.py").read_text()
        assert "harness.record(" in source and "add_record_arguments" in source, name


def test_claims_follow_the_spec_targets():
    spec = (REPO / "docs" / "spec.md").read_text()
    section = spec[spec.index("## 5. Performance targets"):spec.index("## 6.")]
    table = [line for line in section.splitlines()
             if line.startswith("| ") and not line.startswith(("| what", "| ---"))]
    targets = [t for t in TARGETS.values() if t.spec]
    assert len(table) == len(targets), "one claim in benchmarks/targets.py per row of docs/spec.md section 5"
    for line, target in zip(table, targets):
        cited = set(re.findall(r"benchmarks[./](\w+)", line.split("|")[-2]))
        assert cited <= set(target.benchmarks), (target.id, cited)
    for t in TARGETS.values():
        assert all((REPO / "benchmarks" / f"{b}.py").is_file() for b in t.benchmarks), t.id


def test_result_files_hold_well_formed_rows():
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        data = json.loads(path.read_text())
        assert data["benchmark"] == path.stem and (REPO / data["source"]).is_file()
        keys = [(r["claim"], r["machine"]["name"]) for r in data["rows"]]
        assert len(keys) == len(set(keys)), f"{path.name}: a claim twice on one machine"
        for r in data["rows"]:
            assert r["target"] in TARGETS and r["command"].startswith("python -m benchmarks."), r["command"]
            assert r["commit"] and r["date"] and r["unit"]
            assert r.get("carried") or not r.get("dirty"), f"{path.name}: {r['claim']!r} measured on uncommitted code"


def test_benchmarks_md_is_drawn_from_the_rows():
    assert render_benchmarks.main(["--check"]) == 0, "run python -m tools.render_benchmarks"


def test_render_says_where_a_claim_has_no_rows(tmp_path):
    text = render_benchmarks.render(tmp_path)  # no result files at all
    for t in TARGETS.values():
        assert f"### {t.title}" in text and t.missing in text


def test_links_of_the_documents_resolve():
    docs = sorted((REPO / "docs").glob("*.md"))
    for doc in [REPO / "BENCHMARKS.md", REPO / "README.md", REPO / "CONTRIBUTING.md", *docs,
                REPO / "experiments" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to missing {target}"


# -- every product benchmark, end to end on a tiny configuration: it runs and records its rows ------------

@pytest.fixture
def keep_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from test_loader_helpers import make_folder, make_store

    root = tmp_path_factory.mktemp("bench_data")
    images = make_folder(root / "imgs", {"cat": 6, "dog": 6}, size_range=(48, 80))
    return images, make_store(images, root / "labels.tls", map_size=(5, 5))


def _rows(results: Path, name: str) -> list[dict]:
    rows = harness.read_rows(results / f"{name}.json")
    assert rows, f"{name} recorded no rows"
    for r in rows:
        assert r["target"] in TARGETS and r["command"].startswith(f"python -m benchmarks.{name} ")
        assert r["value"] is not None and r["machine"]["name"]
    return rows


def test_label_throughput_records_rows(tmp_path, keep_torch_threads):
    from benchmarks import label_throughput

    out = label_throughput.main(["--batch-size", "4", "--num-classes", "20", "--map-size", "6", "--grid", "3",
                                 "--repeats", "1", "--threads", "1", "--skip-store", "--results-dir", str(tmp_path)])
    rows = {r["what"]: r for r in _rows(tmp_path, "label_throughput")}
    cpu = rows["token targets, numba CPU path (impl='auto')"]
    assert cpu["target"] == "cpu-token-targets" and cpu["goal"] == ">= 8x"
    assert cpu["ratio"] == pytest.approx(out["cpu_targets"][0]["speedup"]["cpu"], rel=1e-5)
    assert cpu["details"]["max_abs_diff"] < 1e-5


def test_train_overhead_records_rows(tmp_path):
    from benchmarks import train_overhead

    out = train_overhead.main(["--batch-size", "2", "--img-size", "32", "--num-classes", "20", "--rounds", "1",
                               "--warmup", "0", "--results-dir", str(tmp_path)])
    rows = _rows(tmp_path, "train_overhead")
    assert {r["target"] for r in rows} == {"train-step-overhead"} and len(rows) == 2
    fused = next(r for r in rows if "fused" in r["what"])
    assert fused["ratio"] == pytest.approx(out["ratio_fused"], rel=1e-5)
    assert "goal" not in fused  # a CPU run of the demo model is not the spec's LV-ViT-S GPU step


def test_class_label_overhead_records_rows(tmp_path, keep_torch_threads):
    from benchmarks import class_label_overhead

    out = class_label_overhead.main(["--model", "test_resnet", "--batch-size", "2", "--img-size", "32",
                                     "--num-classes", "20", "--rounds", "1", "--warmup", "0", "--loss-rounds", "1",
                                     "--threads", "1", "--results-dir", str(tmp_path)])
    rows = _rows(tmp_path, "class_label_overhead")
    assert len(rows) == 3 and {r["target"] for r in rows} == {"class-only-overhead"}
    assert rows[0]["ratio"] == pytest.approx(out["ratio_fused"], rel=1e-5)


def test_annotate_throughput_records_rows(tmp_path, tiny_data, keep_torch_threads):
    from benchmarks import annotate_throughput

    out = annotate_throughput.main(["--images", tiny_data[0], "--img-size", "32", "--rounds", "1", "--batch-size", "4",
                                    "--workers", "0", "--threads", "1", "--work", str(tmp_path / "w"),
                                    "--results-dir", str(tmp_path)])
    end_to_end, loop = _rows(tmp_path, "annotate_throughput")
    assert end_to_end["target"] == "annotate" and end_to_end["ratio"] == pytest.approx(out["ratio"], rel=1e-5)
    assert loop["value"] == pytest.approx(out["annotate_loop_img_s"], rel=1e-5)


def test_loader_benchmarks_record_rows(tmp_path, tiny_data):
    """The loader benchmark and the native-peer benchmark (torch backend; torchvision peer in its own process)."""
    from benchmarks import loader_peers, loader_throughput

    images, labels = tiny_data
    common = ["--images", images, "--labels", labels, "--backends", "torch", "--batch-size", "4", "--image-size",
              "32", "--workers", "0", "--rounds", "1", "--warmup", "0", "--batches", "1", "--results-dir", str(tmp_path)]
    loader_throughput.main(common + ["--workdir", str(tmp_path / "w")])
    rows = _rows(tmp_path, "loader_throughput")
    assert [r["target"] for r in rows] == ["loader-labels-on-off", "loader-vs-peers"]
    assert rows[0]["goal"] == ">= 0.97" and rows[1]["baseline"]["value"] > 0
    loader_peers.main(common + ["--recipes", "crop-flip", "--workdir", str(tmp_path / "p")])
    (peer,) = _rows(tmp_path, "loader_peers")
    assert peer["baseline"]["what"] == "torchvision, no labels" and "goal" not in peer


@pytest.mark.slow
def test_kernel_rows_from_a_smoke_run():
    """kernel_throughput records rows on a GPU only; its rows come from the same figures a CPU smoke run
    (Triton's interpreter) produces, so the GPU run cannot fail on them."""
    import argparse

    if not os.environ.get("TRITON_INTERPRET") and not __import__("torch").cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (or a GPU)")
    from benchmarks import kernel_throughput

    args = argparse.Namespace(device="cpu", batch_size=2, num_classes=20, topk=3, map_size=5, grid=2, smoothing=0.1,
                              repeats=1, sweep=False)
    res = kernel_throughput.run(args)
    rows = kernel_throughput.rows(res, args)
    assert [r["target"] for r in rows] == ["gpu-token-targets"] * 4 + ["gpu-fused-loss"]
    assert all(r["value"] is not None and "goal" in r for r in rows)
