"""Figures of the demo data for BENCHMARKS.md: annotator accuracy, and label-store size on the demo
annotator's real score maps against the public per-image ``.pt`` layout.

    python -m tl_fast.demo.measure [--data DIR]

The public layout is measured, not estimated: every record is written as its own ``torch.save`` of a
``[2, k, H, W]`` float16 tensor (values, then class ids as float16) into a temporary folder, and both
the bytes of those files and their disk usage (file-system blocks) are summed. The lossy store is
written from the same maps.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def _disk_usage(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def measure(data: str | os.PathLike | None = None, *, progress: bool = True, config=None) -> dict:
    """Prepare (or find) the demo data (``config``: a :class:`~tl_fast.demo.DemoConfig`) and return
    its figures."""
    from tqdm.auto import tqdm

    from ..store import LabelStore, StoreWriter
    from . import prepare

    paths = prepare(data, progress=progress, config=config)
    store = LabelStore.open(paths.labels)
    n = len(store)
    maps = store.read(np.arange(n))
    k, (h, w) = store.topk, store.map_size
    out: dict = {"images": n, "num_classes": store.num_classes, "topk": k, "map_size": (h, w),
                 "annotator_val_top1": paths.manifest["annotator"]["val_top1"],
                 "annotator_train_top1": paths.manifest["annotator"]["annotate_train_top1"],
                 "store_bytes": os.path.getsize(paths.labels)}
    with tempfile.TemporaryDirectory(dir=paths.root) as tmp:
        pt_bytes = pt_disk = 0
        for i in tqdm(range(n), desc="public .pt files", unit="file", disable=not progress, leave=False):
            t = torch.stack([maps.values[i], maps.indices[i].to(torch.float16)])
            sub = Path(tmp) / store.keys[i].split("/")[0]
            sub.mkdir(exist_ok=True)
            f = Path(tmp) / f"{store.keys[i]}.pt"
            torch.save(t, f)
            pt_bytes += os.path.getsize(f)
            pt_disk += _disk_usage(f)
        lossy = Path(tmp) / "lossy.tlstore"
        with StoreWriter(lossy, num_classes=store.num_classes, topk=k, map_size=(h, w), lossy=True) as wr:
            for i in range(n):
                wr.add(store.keys[i], maps.values[i], maps.indices[i])
        out["lossy_store_bytes"] = os.path.getsize(lossy)
        lossy_vals = LabelStore.open(lossy).read(np.arange(n)).values.float()
        out["lossy_max_abs_err"] = float((lossy_vals - maps.values.float()).abs().max())
    out.update(pt_bytes=pt_bytes, pt_disk_bytes=pt_disk)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="demo data directory (default: $TL_FAST_DATA or ~/.cache/tl_fast/demo)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    r = measure(args.data, progress=not args.no_progress)
    n = r["images"]
    h, w = r["map_size"]
    print(f"demo annotator: val top-1 {100 * r['annotator_val_top1']:.1f}%, "
          f"train top-1 {100 * r['annotator_train_top1']:.1f}% (image level, pooled output)")
    print(f"maps: {n} images, top-{r['topk']} of K={r['num_classes']} on {h}x{w}")
    print("| layout | bytes | bytes/image | vs public .pt |")
    print("| --- | ---: | ---: | ---: |")
    rows = [("public `.pt` files (sum of file sizes)", r["pt_bytes"]),
            ("public `.pt` files (disk usage, fs blocks)", r["pt_disk_bytes"]),
            ("tl_fast store, lossless", r["store_bytes"]),
            (f"tl_fast store, lossy (max abs error {r['lossy_max_abs_err']:.3g})", r["lossy_store_bytes"])]
    for name, b in rows:
        print(f"| {name} | {b:,} | {b / n:,.0f} | {100 * b / r['pt_bytes']:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
