"""Pictures beside the benchmarks' JSON: bars with their 20th-80th percentile range.

matplotlib is the optional ``plot`` extra; without it a benchmark prints one line and writes no PNG.
"""
from __future__ import annotations

from typing import Sequence

from tl_fast.optional import MissingDependency, require


def save_bars(path: str, title: str, ylabel: str, labels: Sequence[str], series: dict[str, Sequence],
              reference: tuple[str, float] | None = None) -> str | None:
    """Grouped bars: one group per label, one bar per series; each value is ``(median, p20, p80)``
    (or a plain number). ``reference`` draws a labelled horizontal line (a floor, a baseline).
    Returns the PNG path, or None (with a printed line) when matplotlib is missing."""
    try:
        require("matplotlib", "the benchmark picture")
    except MissingDependency as err:
        print(f"no picture: {err}")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    width = 0.8 / max(1, n)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) * max(1, n) * 0.6 + 2), 3.6), dpi=120)
    for j, (name, values) in enumerate(series.items()):
        xs, med, lo, hi = [], [], [], []
        for i, v in enumerate(values):
            if v is None:
                continue
            m, a, b = (v, v, v) if isinstance(v, (int, float)) else v
            xs.append(i - 0.4 + width * (j + 0.5))
            med.append(m)
            lo.append(m - a)
            hi.append(b - m)
        bars = ax.bar(xs, med, width * 0.92, yerr=[lo, hi], capsize=3, label=name)
        ax.bar_label(bars, fmt="%.0f" if max(med, default=0) >= 100 else "%.3g", fontsize=7, padding=2)
    if reference is not None:
        ax.axhline(reference[1], color="black", linestyle="--", linewidth=1)
        ax.annotate(reference[0], (len(labels) - 0.5, reference[1]), ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    if n > 1:
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
