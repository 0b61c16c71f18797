"""Evaluation (top-1 / top-5 over all ranks), a JSON-lines logger and a throughput / ETA meter."""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .distributed import all_reduce_sum


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor] | Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
             loader: Iterable, *, device: torch.device, amp_dtype: torch.dtype | None = None, progress: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and mean cross-entropy of ``predict(images)`` over ``loader``.

    ``predict`` may be a mapping ``{prefix: predict}`` (e.g. the model and its EMA): every predictor
    sees the same batches in one pass over the data, and the result keys carry the prefixes. Counts
    are summed over ranks, so each rank may see its own shard. ``loader`` yields objects with
    ``.images`` and ``.labels`` (a :class:`tl_fast.TokenLabelLoader` batch) or ``(images, labels)``."""
    from tqdm.auto import tqdm

    predictors = dict(predict) if isinstance(predict, Mapping) else {"": predict}
    # Per predictor: correct@1, correct@5, loss sum, count.
    totals = {p: torch.zeros(4, dtype=torch.float64, device=device) for p in predictors}
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images, labels = (batch.images, batch.labels) if hasattr(batch, "images") else batch
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        for prefix, fn in predictors.items():
            with autocast:
                logits = fn(images)
            logits = logits.float()
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            totals[prefix] += torch.stack([
                hit[:, 0].sum().double(), hit.any(1).sum().double(),
                torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
    out: dict[str, float] = {}
    for prefix, t in totals.items():
        c1, c5, loss, n = all_reduce_sum(t).tolist()
        n_ = max(n, 1.0)
        out.update({prefix + "top1": 100.0 * c1 / n_, prefix + "top5": 100.0 * c5 / n_, prefix + "loss": loss / n_,
                    prefix + "count": int(n)})
    return out


class JsonlLogger:
    """Appends one JSON object per line (with a wall-clock ``time``); a no-op when ``path`` is None
    (non-zero ranks). Each line is flushed, so a crashed run keeps its log."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, event: str, **fields: Any) -> None:
        if not self.path:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self._f.write(json.dumps(record, default=_jsonable) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self.path:
            self._f.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    return str(x)


class ThroughputMeter:
    """Images per second (over all ranks) and the time left for the run.

    Rates are measured from the end of the ``skip``-th step after :meth:`start` (warm-up, first
    batches) to the last :meth:`update`."""

    def __init__(self, total_steps: int, world_size: int = 1, skip: int = 2):
        self.total_steps = total_steps
        self.world_size = world_size
        self.skip = max(skip, 1)
        self.start(0)

    def start(self, done_steps: int) -> None:
        """Begin a measuring window (each epoch); ``done_steps`` counts steps already trained."""
        self.done = done_steps
        self._seen = 0
        self._t0: float | None = None
        self._steps = 0
        self._images = 0

    def update(self, batch_images: int) -> None:
        """Count one finished step of ``batch_images`` images on this rank."""
        self.done += 1
        self._seen += 1
        if self._seen == self.skip:
            self._t0 = time.perf_counter()
        elif self._seen > self.skip:
            self._steps += 1
            self._images += batch_images

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    @property
    def images_per_s(self) -> float:
        dt = self._elapsed()
        return self._images * self.world_size / dt if self._steps and dt > 0 else float("nan")

    def eta_s(self) -> float:
        """Seconds left for the remaining training steps at the current rate (NaN until measured)."""
        dt = self._elapsed()
        if not self._steps or dt <= 0:
            return float("nan")
        return (self.total_steps - self.done) * dt / self._steps


def format_seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"
