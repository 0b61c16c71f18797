"""What every benchmark shares: timing, the machine it ran on, and the rows it records.

Timing: each function is called ``warmup`` times, then once per round, the functions taking turns in
every round (so a drift of a shared machine's speed touches them alike); figures are medians with
20th and 80th percentiles.

Rows: a benchmark turns its figures into rows (one claim each: what was measured, its value and
unit, the baseline measured in the same run and their ratio) and :func:`record` stamps them with the
command, the machine, the versions, the git commit and the date, then writes them to
``benchmarks/results/<benchmark>.json``. A new run replaces the rows of the same claim on the same
machine and keeps every other row. ``python -m tools.render_benchmarks`` draws BENCHMARKS.md from
those files.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from benchmarks.targets import TARGETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REQUIRED = ("claim", "target", "what", "value", "unit")


# -- timing ----------------------------------------------------------------------------------------

def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and 20th / 80th percentiles of ``values``."""
    p20, p80 = np.percentile(values, [20, 80])
    return {"median": float(statistics.median(values)), "p20": float(p20), "p80": float(p80)}


@dataclass
class Timing:
    """Wall-clock seconds of every timed call, and the CPU seconds this process used in each
    (all its threads, spin-waiting included)."""
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def stats(self, scale: float = 1.0) -> dict[str, float]:
        """Median, p20 and p80 of the times, multiplied by ``scale`` (1e3 for milliseconds)."""
        return {k: v * scale for k, v in spread(self.seconds).items()}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time every function once per round, in turn, after ``warmup`` calls of each. ``sync`` runs
    around each timed call (``torch.cuda.synchronize`` on a GPU)."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    out = {name: Timing() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            out[name].seconds.append(time.perf_counter() - t0)
            out[name].cpu_seconds.append(time.process_time() - c0)
    return out


# -- the machine, the code -------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """The machine a figure was measured on. ``name`` (the GPU's name on a GPU, else the CPU model
    and core count) identifies it across runs; the rest describes the run's conditions."""
    import torch

    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else None
    cpu = cpu_model()
    return {"name": gpu or f"{cpu}, {cores} cores", "gpu": gpu, "cpu": cpu, "cores": cores, "usable_cores": usable,
            "torch_threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None}


def machine_name(device: str = "cpu") -> str:
    """One line for a benchmark's printed header."""
    m = machine(device)
    return m["gpu"] or f"{m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']})"


def versions() -> dict:
    import torch

    import tl_fast

    out = {"python": platform.python_version(), "torch": torch.__version__, "tl_fast": tl_fast.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def git_state() -> tuple[str, bool | None]:
    """(short commit, dirty) of the checkout; ``TL_FAST_COMMIT`` names the commit where there is no
    git (a copy of the tree on another machine). Changed result files do not count as dirty."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                                cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TL_FAST_COMMIT", "unknown"), None


# -- rows ------------------------------------------------------------------------------------------

def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("result rows")
    g.add_argument("--results-dir", default=str(RESULTS),
                   help="where the rows go, one <benchmark>.json per benchmark (default: benchmarks/results)")
    g.add_argument("--no-record", action="store_true", help="print the figures only; write no rows")


def row(what: str, config: str, value: float | None, unit: str, *, target: str, spread_of: dict | None = None,
        baseline: str | None = None, baseline_value: float | None = None, ratio: float | None = None,
        ratio_of: str | None = None, percent: bool = False, goal: str | None = None, meets: bool | None = None,
        **details) -> dict:
    """One claim. ``spread_of``: ``{"p20", "p80"}`` of ``value``; ``ratio_of``: how the ratio is
    taken ("baseline / value" for a speed-up, "value / baseline" for a cost); ``percent``: the ratio
    reads as a share (shown as 45.7%, not 0.457x); ``details``: further figures of the same
    measurement (shown beside it)."""
    out = {"claim": f"{what} [{config}]" if config else what, "target": target, "what": what, "config": config,
           "value": _number(value), "unit": unit}
    if spread_of:
        out["p20"], out["p80"] = _number(spread_of["p20"]), _number(spread_of["p80"])
    if baseline is not None:
        out["baseline"] = {"what": baseline, "value": _number(baseline_value), "unit": unit}
    if ratio is not None:
        out["ratio"], out["ratio_of"] = _number(ratio), ratio_of
        if percent:
            out["ratio_format"] = "percent"
    if goal is not None:
        out["goal"], out["meets"] = goal, meets
    if details:
        out["details"] = {k: _number(v) if isinstance(v, float) else v for k, v in details.items()}
    return out


def _number(x):
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def command(module: str, argv: Sequence[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, map(str, argv))])


def record(benchmark: str, rows: list[dict], args: argparse.Namespace, argv: Sequence[str] | None, *,
           device: str = "cpu", module: str | None = None) -> Path | None:
    """Stamp ``rows`` (from :func:`row`) with the run's command, machine, versions, commit and date,
    and write them to ``<args.results_dir>/<benchmark>.json`` (nothing with ``--no-record``)."""
    if getattr(args, "no_record", False) or not rows:
        return None
    commit, dirty = git_state()
    stamp = {"command": command(module or f"benchmarks.{benchmark}", argv), "machine": machine(device),
             "versions": versions(), "commit": commit, "dirty": dirty,
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    path = write_rows(benchmark, [{**r, **stamp} for r in rows], getattr(args, "results_dir", None) or RESULTS)
    print(f"{len(rows)} result rows -> {path}")
    return path


def write_rows(benchmark: str, rows: list[dict], results_dir: str | os.PathLike = RESULTS) -> Path:
    """Merge ``rows`` into ``results_dir/<benchmark>.json``: a row replaces the row of the same claim
    on the same machine; other rows stay. Written atomically."""
    for r in rows:
        missing = [k for k in REQUIRED + ("command", "machine", "commit", "date") if k not in r]
        if missing:
            raise ValueError(f"{benchmark}: a result row lacks {missing}: {r.get('claim')!r}")
        if r["target"] not in TARGETS:
            raise ValueError(f"{benchmark}: unknown target {r['target']!r}; add it to benchmarks/targets.py")
    path = Path(results_dir) / f"{benchmark}.json"
    kept = read_rows(path)
    new = {(r["claim"], r["machine"]["name"]) for r in rows}
    merged = [r for r in kept if (r["claim"], r["machine"]["name"]) not in new] + list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"benchmark": benchmark, "source": f"benchmarks/{benchmark}.py", "rows": merged}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{benchmark}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make a checked-in data file private
    os.replace(tmp, path)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    return json.loads(path.read_text())["rows"] if path.is_file() else []
