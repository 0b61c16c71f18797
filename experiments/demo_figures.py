"""Experiment (2026-11-26, last run 2026-12-02): figures of the demo data: annotator accuracy, label-store size on the demo
annotator's real score maps against the public per-image ``.pt`` layout, and how the training crops and
MixToken boxes meet the scenes' known objects.

    PYTHONPATH=. python experiments/demo_figures.py [--data DIR]

Results: docs/demo-evidence.md.

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


def crop_statistics(config=None, *, epochs: int = 4, scale: tuple[float, float] = (0.08, 1.0)) -> dict:
    """How often the training recipe's random resized crop (the plan's, timm's default scale) misses
    the labelled object or is dominated by a distractor, from the scenes' known layouts.

    Object regions are their square boxes (centre +- side / 2). Returns fractions over
    ``epochs`` x train images: ``main_under_half`` (the crop holds < 50% of the main object's box),
    ``main_missed`` (0%), ``distractor_caught`` (some distractor box >= 50% inside the crop) and
    ``distractor_dominates`` (more distractor than main-object area inside the crop).
    """
    from tl_fast.plan import random_resized_crop
    from tl_fast.demo import DemoConfig
    from tl_fast.demo.scenes import scene_layout

    config = config or DemoConfig()
    layouts = [scene_layout(config.seed, "train", c, i, config.num_classes, config.scene)
               for c in range(config.num_classes) for i in range(config.train_per_class)]
    sizes = np.array([(lay.height, lay.width) for lay in layouts])
    counts = dict.fromkeys(("main_under_half", "main_missed", "distractor_caught", "distractor_dominates"), 0)
    for epoch in range(epochs):
        crops = random_resized_crop(config.seed, epoch, np.arange(len(layouts)), sizes, scale=scale)
        for lay, (top, left, ch, cw) in zip(layouts, crops):
            main_in = main_area = distractor_in = 0.0
            caught = False
            for o in lay.objects:
                half = o.size / 2
                ix = max(0.0, min(o.cx + half, left + cw) - max(o.cx - half, left))
                iy = max(0.0, min(o.cy + half, top + ch) - max(o.cy - half, top))
                inside = ix * iy
                if o.main:
                    main_in = inside / (o.size * o.size)
                    main_area = inside
                else:
                    distractor_in += inside
                    caught |= inside >= 0.5 * o.size * o.size
            counts["main_under_half"] += int(main_in < 0.5)
            counts["main_missed"] += int(main_in == 0.0)
            counts["distractor_caught"] += int(caught)
            counts["distractor_dominates"] += int(distractor_in > main_area)
    n = epochs * len(layouts)
    return {k: v / n for k, v in counts.items()}


def _main_object_tokens(layout, crop, grid: tuple[int, int]) -> np.ndarray:
    """``[Gh, Gw]`` bool: tokens of the crop ``(top, left, h, w)`` whose centre shows the scene's main
    object (the topmost object's square box holding the centre is the main one)."""
    top, left, ch, cw = (float(v) for v in crop)
    gh, gw = grid
    ys = top + (np.arange(gh)[:, None] + 0.5) / gh * ch
    xs = left + (np.arange(gw)[None, :] + 0.5) / gw * cw
    owner = np.full((gh, gw), -1)
    for k, o in enumerate(layout.objects):  # drawing order: later objects are on top
        half = o.size / 2
        owner[(np.abs(ys - o.cy) <= half) & (np.abs(xs - o.cx) <= half)] = k
    main = next(k for k, o in enumerate(layout.objects) if o.main)
    return owner == main


def mixtoken_statistics(config=None, *, epochs: int = 4, scale: tuple[float, float] = (0.25, 1.0),
                        grid: tuple[int, int] = (8, 8), batch_size: int = 64) -> dict:
    """How well MixToken's area rule for the class target (``lam`` = share of the sample's own tokens)
    matches what the mixed token grid shows, from the scenes' known layouts.

    The demo trainer's recipe: random resized crops at ``scale`` (the demo preset's 0.25-1), an 8 x 8
    token grid, one box per batch of ``batch_size`` by the loader's draw, partner ``B - 1 - b``. For a
    mixed sample, the *object share* is its own main-object tokens left outside the box over those plus
    the partner's main-object tokens pasted inside it: the class split the tokens show. (Flips are left
    out: they move the object within the crop, and the box is uniform.) Returns over ``epochs``
    epochs: ``mean_abs_gap`` (mean ``|lam - object share|`` where some main object shows),
    ``majority_flipped`` (the area rule and the object share put more than half of the target on
    different images), ``own_object_hidden`` (``lam >= 0.5`` yet the box covers every token of the
    sample's own main object, which its crop showed), ``no_main_object`` (neither main object shows)
    and ``mean_lam``.
    """
    from tl_fast.loaders.loader import epoch_order
    from tl_fast.plan import draw_mix_box, random_resized_crop
    from tl_fast.demo import DemoConfig
    from tl_fast.demo.scenes import scene_layout

    config = config or DemoConfig()
    layouts = [scene_layout(config.seed, "train", c, i, config.num_classes, config.scene)
               for c in range(config.num_classes) for i in range(config.train_per_class)]
    sizes = np.array([(lay.height, lay.width) for lay in layouts])
    batch_size = min(batch_size, len(layouts))  # a tiny dataset still gives one batch per epoch
    gaps, flipped, hidden, empty, lams = [], 0, 0, 0, []
    for epoch in range(epochs):
        order = epoch_order(config.seed, epoch, np.arange(len(layouts)), shuffle=True)
        crops = random_resized_crop(config.seed, epoch, np.arange(len(layouts)), sizes, scale=scale)
        objects = [_main_object_tokens(lay, crop, grid) for lay, crop in zip(layouts, crops)]
        for step in range(len(order) // batch_size):
            batch = order[step * batch_size:(step + 1) * batch_size]
            mix = draw_mix_box(config.seed, epoch, step, grid)
            r1, c1, r2, c2 = mix.boxes[0]
            lam = float(mix.lam[0])
            inside = np.zeros(grid, dtype=bool)
            inside[r1:r2, c1:c2] = True
            for b, i in enumerate(batch):
                own, partner = objects[i], objects[batch[len(batch) - 1 - b]]
                kept, pasted = (own & ~inside).sum(), (partner & inside).sum()
                lams.append(lam)
                if kept + pasted == 0:
                    empty += 1
                    continue
                share = kept / (kept + pasted)
                gaps.append(abs(lam - share))
                flipped += int((lam > 0.5) != (share > 0.5))
                hidden += int(lam >= 0.5 and own.any() and kept == 0)
    n = len(lams)
    return {"samples": n, "mean_abs_gap": float(np.mean(gaps)) if gaps else 0.0,
            "majority_flipped": flipped / n, "own_object_hidden": hidden / n, "no_main_object": empty / n,
            "mean_lam": float(np.mean(lams))}


def measure(data: str | os.PathLike | None = None, *, progress: bool = True, config=None) -> dict:
    """Prepare (or find) the demo data (``config``: a :class:`~tl_fast.demo.DemoConfig`) and return
    its figures."""
    from tqdm.auto import tqdm

    from tl_fast.store import LabelStore, StoreWriter
    from tl_fast.demo import prepare

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
    out["crops"] = crop_statistics(config)
    out["mixtoken"] = mixtoken_statistics(config)
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
    c = r["crops"]
    print(f"random resized crops (scale 0.08-1, 4 epochs): {100 * c['main_under_half']:.1f}% hold under half of "
          f"the main object ({100 * c['main_missed']:.1f}% none of it), {100 * c['distractor_caught']:.1f}% hold "
          f"at least half of a distractor, {100 * c['distractor_dominates']:.1f}% show more distractor than "
          "main object")
    m = r["mixtoken"]
    print("MixToken on the demo trainer's crops (scale 0.25-1, 8x8 tokens, batch 64): "
          f"mean lam {m['mean_lam']:.2f}; "
          f"the area-mixed class target is {m['mean_abs_gap']:.2f} from the main objects' token share on average, "
          f"gives the majority to the other image in {100 * m['majority_flipped']:.1f}% of samples, and keeps "
          f"lam >= 0.5 on {100 * m['own_object_hidden']:.1f}% whose own object the box covers entirely "
          f"({100 * m['no_main_object']:.1f}% show neither main object)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
