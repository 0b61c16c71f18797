"""``tl-fast demo compare`` / ``python -m tl_fast.demo.compare`` (what ``scripts/demo.sh`` runs): the demo's
LV-ViT trained twice on the demo data, side by side, once with token labels and once as the class-token
baseline (hard labels), then both val top-1 curves and images/s in one picture.

The two runs are the same trainer command (``--preset demo``: model, data, schedule, batch, crops,
optimizer, evaluation and seed) except ``--no-token-label`` for the baseline; ``summary.json`` records
which logged options differ, so that claim is checked on every run. Each run gets half of the cores
(torch threads) and one loader worker; ``--no-baseline`` trains token labeling alone on all of them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name -> (what the closing lines call it, the trainer options that make it)
RUNS = {
    "token_labeling": ("token labeling", []),
    "baseline": ("baseline (hard labels)", ["--no-token-label"]),
}
# Logged options that may differ between the runs without making them different experiments.
_BOOKKEEPING = {"output"}

DESCRIPTION = """Train the demo's LV-ViT with token labeling and, beside it, the class-token baseline on the same
data, schedule and seed with hard labels; then draw both val top-1 curves and their images/s into
<output>/curves.png and write <output>/summary.json. The demo data is built on first use (a few minutes)."""

EPILOG = """examples:
  %(prog)s                               # both runs, seed 0, into runs/demo
  %(prog)s --seed 1 --output runs/demo1  # another seed
  %(prog)s --no-baseline                 # token labeling alone (exercises the data path only)
  %(prog)s -- --epochs 4 --loader torch  # options after -- go to both trainer runs (tl-fast train --help)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (weights, plans, data order)")
    p.add_argument("--output", default="runs/demo", help="folder for summary.json, curves.png and one folder per run")
    p.add_argument("--no-baseline", action="store_true", help="train token labeling alone")
    p.add_argument("--loader", choices=("dali", "ffcv", "torch"), default="dali", help="image pipeline of both runs")
    p.add_argument("--data", help="demo data directory (default: $TL_FAST_DATA or ~/.cache/tl_fast/demo-v2)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the cores shared between the runs)")
    p.add_argument("--workers", type=int, default=1, help="loader workers per run")
    p.add_argument("--no-progress", action="store_true", help="print epoch lines instead of progress bars")
    p.add_argument("trainer_args", nargs="*", metavar="-- TRAINER_OPTION",
                   help="options after -- are passed to both trainer runs")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def trainer_command(name: str, args: argparse.Namespace) -> list[str]:
    """The trainer command of one run; the runs differ in ``RUNS[name][1]`` and their output folder."""
    return [sys.executable, "-m", "tl_fast.train", "--preset", "demo", "--loader", args.loader,
            "--seed", str(args.seed), "--workers", str(args.workers), "--output", str(Path(args.output) / name),
            "--no-plot", "--no-progress", *RUNS[name][1], *args.trainer_args]


def read_log(folder: Path) -> dict | None:
    """The run's ``log.jsonl`` as :func:`tl_fast.train.plot.read_run` reads it, or None before it exists."""
    from ..train.plot import read_run
    path = folder / "log.jsonl"
    return read_run(path) if path.is_file() else None


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_summary(folder: Path, wall_s: float) -> dict:
    """Final top-1/top-5, images/s (median over epochs), the curves and the logged configuration."""
    run = read_log(folder) or {"head": {}, "epochs": [], "evals": []}
    start, epochs, evals = run["head"], run["epochs"], run["evals"]
    speeds = [s for s in (_finite(r.get("train_images_per_s")) for r in epochs) if s is not None]
    last = evals[-1] if evals else {}
    return {
        "top1": last.get("top1"), "top5": last.get("top5"),
        "img_per_s": statistics.median(speeds) if speeds else None,
        "best_top1": max((r["top1"] for r in evals), default=None),
        "curve": [{"epoch": r["epoch"], "top1": r["top1"], "top5": r["top5"]} for r in evals],
        "img_per_s_by_epoch": [{"epoch": r["epoch"], "img_per_s": _finite(r.get("train_images_per_s"))}
                               for r in epochs],
        "wall_s": round(wall_s, 1), "params": start.get("params"), "config": start.get("args", {}),
    }


def config_differences(runs: dict[str, dict]) -> list[str]:
    """Logged trainer options whose values differ between the runs (output folders aside)."""
    configs = [r["config"] for r in runs.values()]
    keys = set().union(*configs)
    return sorted(k for k in keys - _BOOKKEEPING if len({str(c.get(k)) for c in configs}) > 1)


def _progress(names: list[str], enabled: bool):
    """Per-run bars over optimizer steps (the trainers log every 10 steps), or epoch lines."""
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return {n: tqdm(total=1, desc=f"{RUNS[n][0]:>22}", unit="step", position=i, dynamic_ncols=True)
            for i, n in enumerate(names)}


def _follow(name: str, folder: Path, bars, printed: dict) -> None:
    run = read_log(folder)
    if run is None or not run["head"]:
        return
    start, evals = run["head"], run["evals"]
    if bars is not None:
        bar, steps = bars[name], [r["step"] for r in run["train"]]
        bar.total = int(start["steps_per_epoch"]) * int(start["args"]["epochs"])
        bar.update(max(steps, default=0) - bar.n)  # update(), not n =: tqdm's rate and ETA follow recent steps
        if evals:
            bar.set_postfix(epoch=evals[-1]["epoch"], top1=f"{evals[-1]['top1']:.1f}%", refresh=False)
        bar.refresh()
        return
    for r in evals[printed.get(name, 0):]:
        print(f"{RUNS[name][0]}: epoch {r['epoch']}/{start['args']['epochs']} top-1 {r['top1']:.2f}% "
              f"({_finite(r.get('train_images_per_s')) or float('nan'):.0f} img/s)", flush=True)
    printed[name] = len(evals)


def train_runs(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Start every run at once, follow their logs, and return their summaries (exit on a failed run)."""
    out = Path(args.output)
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // len(names))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if args.data:
        env["TL_FAST_DATA"] = str(Path(args.data).expanduser())
    procs, t0 = {}, time.monotonic()
    for name in names:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "log.jsonl").unlink(missing_ok=True)
        cmd = trainer_command(name, args)
        (folder / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
        with open(folder / "train.out", "w") as log:
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    bars, printed, walls = _progress(names, not args.no_progress), {}, {}
    try:
        while len(walls) < len(procs):
            time.sleep(1.0)
            for name, proc in procs.items():
                _follow(name, out / name, bars, printed)
                if name not in walls and proc.poll() is not None:
                    walls[name] = time.monotonic() - t0
    except KeyboardInterrupt:
        for proc in procs.values():
            proc.terminate()
        raise
    finally:
        for bar in (bars or {}).values():
            bar.close()
    failed = [n for n, p in procs.items() if p.returncode != 0]
    if failed:
        for name in failed:
            tail = (out / name / "train.out").read_text().splitlines()[-15:]
            print(f"--- {RUNS[name][0]} failed (exit {procs[name].returncode}); last lines of "
                  f"{out / name / 'train.out'}:\n" + "\n".join(tail), file=sys.stderr)
        raise SystemExit(1)
    return {name: run_summary(out / name, walls[name]) for name in names}


def plot_compare(summary: dict, path: Path) -> Path:
    """Val top-1 over epochs and training images/s over epochs, one line per run."""
    from ..optional import require
    require("matplotlib", "drawing the demo's curves").use("Agg")
    import matplotlib.pyplot as plt

    colours = {"token_labeling": "tab:blue", "baseline": "tab:orange"}
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for name, (label, _) in RUNS.items():
        run = summary.get(name)
        if not run:
            continue
        ax_acc.plot([p["epoch"] for p in run["curve"]], [p["top1"] for p in run["curve"]], "o-", ms=3,
                    color=colours[name], label=f"{label}: {run['top1']:.1f}%" if run["top1"] is not None else label)
        speed = [p for p in run["img_per_s_by_epoch"] if p["img_per_s"] is not None]
        ax_speed.plot([p["epoch"] for p in speed], [p["img_per_s"] for p in speed], "o-", ms=3, color=colours[name],
                      label=f"{label}: {run['img_per_s']:.0f} img/s" if run["img_per_s"] else label)
    ax_acc.set(title="val top-1", xlabel="epoch", ylabel="top-1 (%)")
    ax_speed.set(title="training throughput per run", xlabel="epoch", ylabel="images / s")
    ax_speed.set_ylim(bottom=0)
    for ax in (ax_acc, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    title = f"demo, seed {summary['seed']}, {summary['epochs']} epochs"
    if summary.get("gain_points") is not None:
        title += f": token labeling {summary['gain_points']:+.1f} points top-1"
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def closing_lines(summary: dict) -> list[str]:
    lines = []
    for name, (label, _) in RUNS.items():
        run = summary.get(name)
        if run and run["top1"] is not None:
            speed = f"{run['img_per_s']:.1f} img/s" if run["img_per_s"] else "img/s not measured"
            lines.append(f"{label:>22}: top-1 {run['top1']:.2f}%, top-5 {run['top5']:.2f}%, {speed}")
    if summary.get("gain_points") is not None:
        ratio = summary.get("throughput_ratio")
        lines.append(f"{'gain':>22}: {summary['gain_points']:+.2f} points top-1 for token labeling; throughput "
                     + (f"{ratio:.2f}x the baseline's" if ratio else "ratio not measured"))
    return lines


def run(args: argparse.Namespace) -> dict:
    from . import prepare

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if "--data" not in args.trainer_args:  # the runs use the demo data: built once, here, with a progress bar
        prepare(args.data, progress=not args.no_progress)
    names = ["token_labeling"] if args.no_baseline else list(RUNS)
    t0 = time.monotonic()
    runs = train_runs(args, names)
    tl = runs["token_labeling"]
    summary = {**runs, "seed": args.seed, "epochs": int(tl["config"].get("epochs", 0)),
               "wall_s": round(time.monotonic() - t0, 1)}
    if "baseline" in runs:
        base = runs["baseline"]
        summary["config_differences"] = config_differences(runs)
        if tl["top1"] is not None and base["top1"] is not None:
            summary["gain_points"] = round(tl["top1"] - base["top1"], 2)
        if tl["img_per_s"] and base["img_per_s"]:
            summary["throughput_ratio"] = round(tl["img_per_s"] / base["img_per_s"], 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    try:
        curves = plot_compare(summary, out / "curves.png")
    except ImportError as err:  # MissingDependency: matplotlib is the plot extra
        curves = f"not drawn ({err})"
    print(f"summary: {out / 'summary.json'}, curves: {curves}, runs: "
          + ", ".join(str(out / n) for n in names) + f" ({summary['wall_s']:.0f} s)")
    for line in closing_lines(summary):
        print(line)
    return summary


def main(argv: list[str] | None = None) -> int:
    run(build_parser("python -m tl_fast.demo.compare").parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
