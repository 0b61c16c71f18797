"""Training curves from a run's ``log.jsonl``: loss, learning rate, val top-1 (model and EMA), images/s.

``tl-fast plot RUN_DIR`` redraws ``RUN_DIR/curves.png``; the trainer calls :func:`plot_run` at the end
of a run. matplotlib is optional (the ``plot`` extra) and imported only here."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..optional import MissingDependency, require


def read_run(log_path: str | os.PathLike) -> dict:
    """The latest run in ``log_path``: its records from the last ``start`` on, the steps where it was
    resumed, and the steps per epoch (to draw everything against epochs). A run still writing its log
    may have a last line cut short; the records before it are read."""
    records = []
    for line in Path(log_path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    records = records[starts[-1]:] if starts else records
    head = next((r for r in records if r.get("event") in ("start", "resume")), {})
    spe = max(int(head.get("steps_per_epoch") or 1), 1)
    train = [r for r in records if r.get("event") == "train"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    evals = [r for r in epochs if "top1" in r]
    resumes = [r for r in records if r.get("event") == "resume"]
    return {"head": head, "steps_per_epoch": spe, "train": train, "epochs": epochs, "evals": evals,
            "resumes": resumes, "end": next((r for r in reversed(records) if r.get("event") == "end"), None)}


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw ``run_dir/log.jsonl`` into ``out`` (default ``run_dir/curves.png``); returns the path."""
    require("matplotlib", f"drawing the curves of {run_dir} (tl-fast plot)").use("Agg")
    import matplotlib.pyplot as plt
    run_dir = Path(run_dir)
    log_path = run_dir / "log.jsonl" if run_dir.is_dir() else run_dir
    if not log_path.is_file():
        raise FileNotFoundError(f"no log.jsonl in {run_dir}; point tl-fast plot to a trainer's --output folder")
    run = read_run(log_path)
    spe = run["steps_per_epoch"]
    args = run["head"].get("args", {})
    epoch_of = lambda r: r["step"] / spe  # noqa: E731

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, constrained_layout=True)
    (ax_loss, ax_acc), (ax_lr, ax_speed) = axes
    t = run["train"]
    ax_loss.plot([epoch_of(r) for r in t], [r["loss"] for r in t], color="tab:blue", lw=1.2)
    ax_loss.set(title="training loss", ylabel="loss")
    e = run["evals"]
    ax_acc.plot([r["epoch"] for r in e], [r["top1"] for r in e], "o-", color="tab:blue", ms=3, label="model")
    if any("ema_top1" in r for r in e):
        ax_acc.plot([r["epoch"] for r in e if "ema_top1" in r], [r["ema_top1"] for r in e if "ema_top1" in r],
                    "s--", color="tab:orange", ms=3, label="EMA")
    if e:
        best = max(e, key=lambda r: max(r["top1"], r.get("ema_top1", float("-inf"))))
        top = max(best["top1"], best.get("ema_top1", float("-inf")))
        ax_acc.annotate(f"best {top:.2f}%", (best["epoch"], top), textcoords="offset points", xytext=(-6, 8),
                        ha="right", fontsize=9)
        ax_acc.legend(loc="lower right")
    ax_acc.set(title="val top-1", ylabel="top-1 (%)")
    ax_lr.plot([epoch_of(r) for r in t], [r["lr"] for r in t], color="tab:green", lw=1.2)
    ax_lr.set(title="learning rate", ylabel="lr", xlabel="epoch")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    speed = [r for r in t if r.get("images_per_s") == r.get("images_per_s") and r.get("images_per_s") is not None]
    ax_speed.plot([epoch_of(r) for r in speed], [r["images_per_s"] for r in speed], color="tab:purple", lw=1.2)
    ax_speed.set(title="training throughput (all ranks)", ylabel="images / s", xlabel="epoch")
    ax_speed.set_ylim(bottom=0)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        for i, r in enumerate(run["resumes"]):
            x = r["step"] / spe
            ax.axvline(x, color="grey", ls=":", lw=1.2, label=f"resumed at step {r['step']}" if ax is ax_loss else None)
    if run["resumes"]:
        ax_loss.legend(loc="upper right")
    title = f"{run_dir.name}: {args.get('model', '?')}, {args.get('img_size', '?')} px, " \
            f"{'token labels' if args.get('token_label') == 'True' else 'hard labels'}, batch " \
            f"{args.get('batch_size', '?')} x {run['head'].get('world_size', 1)}, {args.get('opt', 'adamw')}"
    fig.suptitle(title, fontsize=11)
    out = Path(out) if out else log_path.parent / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw a training run's curves (loss, lr, top-1, images/s) into a PNG",
                       description="Redraw RUN_DIR/curves.png from RUN_DIR/log.jsonl (the trainer's --output "
                       "folder). Needs matplotlib: pip install \"tl-fast[plot]\".")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trainer --output folder (or its log.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        print(plot_run(args.run_dir, args.out))
    except (MissingDependency, FileNotFoundError) as err:
        raise SystemExit(f"tl-fast plot: error: {err}") from None
    return 0
