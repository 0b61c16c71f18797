"""Does token labeling help? Trains the same small LV-ViT (or timm ViT) on the demo dataset with and without it.

    python -m benchmarks.token_label_evidence --epochs 300 --seeds 0 1 --parallel 4
    python -m benchmarks.token_label_evidence --variants vit-hard vit-class vit-tokens --baseline vit-hard \
        --epochs 15 --parallel 2 --threads 1 -- --depth 4 --dim 96 --heads 3

Each run is ``examples/train_lvvit.py --preset demo`` with one variant's flags (below) and one seed;
runs go ``--parallel`` at a time, each logging to ``<out>/<variant>_s<seed>/``. The table gives the
final val top-1 of the model and its EMA per seed, their mean, and each variant against ``--baseline``
(class-token only by default). Runs still going at ``--time-limit`` are stopped and reported as
unfinished (a cosine schedule cut short is not a result). With no ``--data`` the built-in demo dataset
is prepared first. Rows: each variant's mean top-1 against the baseline's
(``benchmarks/results/token_label_evidence.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> trainer flags
    "cls-only": ["--no-token-label"],  # (a) hard labels on the class token, no mixing
    "token-label-mixtoken": ["--mixtoken"],  # (b) the paper's recipe: token labeling with MixToken
    "cls-mixtoken": ["--no-token-label", "--mixtoken"],  # (a') same MixToken boxes, hard labels mixed by area
    "token-label": ["--no-mixtoken"],  # (c) token labeling without mixing
    # (b) with the experimental class target weighed by what the mixed tokens show, not by area
    # (experiments/mix_class_target.py)
    "token-label-mixtoken-content": ["--mix-cls-target", "content"],
    # A small timm CNN (the demo-cnn preset's test_resnet): hard labels vs the annotator's pooled crop targets
    "cnn-hard": ["--model", "test_resnet", "--no-token-label"],
    "cnn-pooled": ["--model", "test_resnet", "--label-mode", "class"],
    # A small timm ViT (8 px patches: an 8x8 grid at 64 px; its size from the flags after --): hard labels,
    # the pooled crop target on its class output, and token labeling + MixToken through token_labeling()
    "vit-hard": ["--model", "vit_tiny_patch16_224", "--patch-size", "8", "--no-token-label"],
    "vit-class": ["--model", "vit_tiny_patch16_224", "--patch-size", "8", "--label-mode", "class"],
    "vit-tokens": ["--model", "vit_tiny_patch16_224", "--patch-size", "8", "--mixtoken"],
    "vit-tokens-nomix": ["--model", "vit_tiny_patch16_224", "--patch-size", "8", "--no-mixtoken"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="demo-layout folder (train/, val/, train_labels.tlstore); default: prepare the demo")
    p.add_argument("--labels", help="label store of the train split (default: <data>/train_labels.tlstore)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=["cls-only", "token-label-mixtoken"])
    p.add_argument("--baseline", default="cls-only", choices=tuple(VARIANTS),
                   help="the variant the others are compared with, seed by seed")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each with --workers loader workers)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per run")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--eval-every", type=int, default=10, help="epochs between val evaluations (the last always)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; stop unfinished runs then (0: none)")
    p.add_argument("--out", default="runs/token_label_evidence", help="run folders (checkpoint, log, stdout)")
    p.add_argument("--summary", help="summary JSON with every run's evaluations (default: <out>/summary.json)")
    p.add_argument("extra", nargs="*", help="more trainer flags, after --")
    harness.add_record_arguments(p)
    return p.parse_args(argv)


def demo_data(path: str | None) -> Path:
    if path:
        return Path(path)
    from tl_fast.demo import prepare
    return Path(prepare(progress=False).root)


def command(args, data: Path, variant: str, seed: int, out: Path) -> list[str]:
    # Variants with the experiment's options run the trainer through experiments/mix_class_target.py.
    experiment = "--mix-cls-target" in VARIANTS[variant]
    script = ROOT / "experiments" / "mix_class_target.py" if experiment else ROOT / "examples" / "train_lvvit.py"
    return [sys.executable, str(script), "--preset", "demo", "--data", str(data),
            "--labels", args.labels or str(data / "train_labels.tlstore"), "--epochs", str(args.epochs), "--seed", str(seed),
            "--workers", str(args.workers), "--eval-every", str(args.eval_every), "--output", str(out),
            "--no-progress", *VARIANTS[variant], *args.extra]


def run_all(args, data: Path, out_root: Path) -> dict[str, dict]:
    """Runs every (variant, seed) with at most ``args.parallel`` alive; returns their exit states."""
    queue = [(v, s) for s in args.seeds for v in args.variants]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT) + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    states: dict[str, dict] = {}
    deadline = time.monotonic() + args.time_limit if args.time_limit > 0 else float("inf")
    while queue or running:
        while queue and len(running) < args.parallel and time.monotonic() < deadline:
            variant, seed = queue.pop(0)
            name = f"{variant}_s{seed}"
            out = out_root / name
            out.mkdir(parents=True, exist_ok=True)
            cmd = command(args, data, variant, seed, out)
            (out / "command.txt").write_text(" ".join(cmd) + "\n")
            log = open(out / "stdout.txt", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), time.monotonic())
            print(f"started {name}", flush=True)
        if not running:  # the deadline passed with runs still queued
            for variant, seed in queue:
                states[f"{variant}_s{seed}"] = {"state": "not started"}
            break
        time.sleep(1.0)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None and time.monotonic() > deadline:
                proc.terminate()
                proc.wait()
                states[name] = {"state": "stopped at the time limit", "seconds": time.monotonic() - t0}
            elif proc.poll() is not None:
                states[name] = {"state": "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
                                "seconds": time.monotonic() - t0}
            else:
                continue
            del running[name]
            print(f"{name}: {states[name]['state']} after {states[name]['seconds']:.0f} s", flush=True)
    return states


def read_evals(folder: Path) -> list[dict]:
    """Every evaluated epoch (and its accuracies) from the run's log.jsonl, in order."""
    evals = []
    log = folder / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row.get("event") == "epoch" and "top1" in row:
                evals.append({k: row.get(k) for k in ("epoch", "top1", "ema_top1", "train_images_per_s")})
    return evals


def summarize(args, states: dict, out_root: Path) -> dict:
    rows, finals = [], {}
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant}_s{seed}"
            evals = read_evals(out_root / name)
            state = states.get(name, {}).get("state", "?")
            last = evals[-1] if evals else None
            done = state == "finished" and last is not None and last["epoch"] == args.epochs
            if done:
                finals.setdefault(variant, []).append((seed, last["top1"], last["ema_top1"]))
            rows.append({"run": name, "state": state, **(last or {}), "evals": evals})
    print(f"\nval top-1 (%) after {args.epochs} epochs on the demo dataset, model (EMA, where kept):")
    print(f"{'variant':<30}" + "".join(f"{'seed ' + str(s):>18}" for s in args.seeds) + f"{'mean':>10}")
    base = {seed: top1 for seed, top1, _ in finals.get(args.baseline, [])}
    key = "minus_" + args.baseline.replace("-", "_")
    table = {}
    for variant in args.variants:
        got = {seed: (t, e) for seed, t, e in finals.get(variant, [])}
        cells = "".join(f"{_cell(*got[s]) if s in got else 'unfinished':>18}" for s in args.seeds)
        mean = statistics.mean(t for t, _ in got.values()) if got else float("nan")
        table[variant] = {"per_seed": {s: {"top1": t, "ema_top1": e} for s, (t, e) in got.items()}, "mean_top1": mean}
        if variant != args.baseline and base and got:
            deltas = [got[s][0] - base[s] for s in got if s in base]
            table[variant][key] = deltas
        print(f"{variant:<30}{cells}{mean:>10.2f}")
    for variant, t in table.items():
        if key in t:
            print(f"{variant} minus {args.baseline}, per seed: " + ", ".join(f"{d:+.2f}" for d in t[key]))
    for row in rows:
        if row["state"] != "finished":
            print(f"{row['run']}: {row['state']} (last evaluated epoch {row.get('epoch', '-')})")
    return {"epochs": args.epochs, "seeds": args.seeds, "extra": args.extra, "runs": rows, "table": table}


def _cell(top1: float, ema_top1: float | None) -> str:
    return f"{top1:.2f}" + (f" ({ema_top1:.2f})" if ema_top1 is not None else "")


def _trainer_device(extra: list[str]) -> str:
    """The device the runs trained on: the trainer's ``--device`` flag, else its default."""
    import torch

    if "--device" in extra[:-1]:
        return extra[extra.index("--device") + 1]
    return "cuda" if torch.cuda.is_available() else "cpu"


def rows(args, summary: dict) -> list[dict]:
    """Each variant's mean val top-1 over its finished seeds against ``--baseline``'s, on the seeds both
    finished."""
    table = summary["table"]
    base = args.baseline
    out = []
    for variant, t in table.items():
        if variant == base or base not in table:
            continue
        seeds = sorted(set(t["per_seed"]) & set(table[base]["per_seed"]))
        if not seeds:
            continue
        mean = sum(t["per_seed"][s]["top1"] for s in seeds) / len(seeds)
        base_mean = sum(table[base]["per_seed"][s]["top1"] for s in seeds) / len(seeds)
        config = (f"demo data, {args.epochs} epochs, seeds {' '.join(map(str, seeds))}, trainer flags "
                  f"{' '.join(VARIANTS[variant] + args.extra) or '(preset)'}")
        out.append(harness.row(f"{variant}: mean val top-1", config, mean, "% top-1", target="demo",
                               baseline=f"{base}: mean val top-1, same seeds", baseline_value=base_mean,
                               difference=round(mean - base_mean, 2),
                               per_seed={s: t["per_seed"][s]["top1"] for s in seeds},
                               baseline_per_seed={s: table[base]["per_seed"][s]["top1"] for s in seeds},
                               wall_s=round(summary.get("wall_s", 0.0))))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data = demo_data(args.data)
    print(f"data {data} ready after {time.monotonic() - t0:.0f} s; {len(args.variants) * len(args.seeds)} runs of "
          f"{args.epochs} epochs, {args.parallel} at a time", flush=True)
    states = run_all(args, data, out_root)
    summary = summarize(args, states, out_root)
    summary["wall_s"] = time.monotonic() - t0
    Path(args.summary or out_root / "summary.json").write_text(json.dumps(summary, indent=1))
    harness.record("token_label_evidence", rows(args, summary), args, argv, device=_trainer_device(args.extra))
    return 0 if all(s.get("state") == "finished" for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
