"""`tl-fast annotate` against a plain timm inference loop: same images, model, input size, batch, workers.

The plain loop is what a user runs to classify a folder: the same DataLoader (workers decode and
resize whole images, :class:`tl_fast.annotate.images.ResizedImages`), normalization on the device,
``model(x)``, the image-level top-5 to the host. The annotator adds the dense head at every map
position, the top-k per position, encoding the records (writer thread), the block files and the
final store. Rounds alternate which of the two runs first; the figures are medians over rounds, and
the ratio is the median of the per-round ratios (the machine is shared and noisy).

``annotate`` is timed end to end (the library call: listing from the index cache, weights digest,
the loop, assembly of the store); ``loop`` is its inference loop alone. Stage shares are the
annotator's loop time per stage; ``writer`` is the writer thread's busy time, which overlaps the
loop. On CUDA the shares come from an extra profiled round (a synchronize after each stage).

    python -m benchmarks.annotate_throughput --threads 1 --img-size 96 --rounds 9   # CPU (BENCHMARKS.md)
    python -m benchmarks.annotate_throughput --device cuda --amp --channels-last --model convnextv2_large \\
        --img-size 384 --batch-size 64 --workers 12 --num-images 4096 --rounds 5      # GPU variant
    python -m benchmarks.annotate_throughput --disk       # store bytes per image by map size

Rows: annotate against the plain loop; with ``--disk``, the store's bytes per image by map size
against the public file (``benchmarks/results/annotate_throughput.json``).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import harness
from benchmarks.common import smooth_topk_maps
from tl_fast.annotate import annotate, build_model, data_config, list_images
from tl_fast.annotate.images import ResizedImages

RATIO_TARGET = 0.95


def make_images(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``n`` JPEGs of varied sizes (smooth colour fields with noise), ImageFolder layout, made once."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n} {classes} {seed}":
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        h, w = (int(v) for v in rng.integers(200, 400, size=2))
        low = rng.random((4, 4, 3)) * 255
        img = Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:06d}.jpg", quality=90)
    done.write_text(f"{n} {classes} {seed}")
    return root


def disk_table(num_classes: int = 1000, topk: int = 5, n: int = 256) -> list[dict]:
    """Bytes per image of the store for common annotator map sizes, from real encodings: annotator-like
    (smooth) maps and, as the worst case, maps without spatial structure. Whole file (records,
    index, manifest with ImageNet-style keys) over the number of records."""
    from tl_fast.store import StoreWriter

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in (12, 14, 18, 24, 32):
            values, indices = smooth_topk_maps(n, num_classes, topk, side)
            gen = torch.Generator().manual_seed(1)
            rand_v = torch.randn(n, topk, side, side, generator=gen).sort(1, descending=True).values.half()
            rand_i = torch.randint(0, num_classes, (n, topk, side, side), generator=gen)
            row = {"map": f"{side}x{side}", "public_pt_bytes": None}
            for kind, (v, i) in {"smooth": (values, indices), "random": (rand_v, rand_i)}.items():
                for lossy in (False, True):
                    path = os.path.join(tmp, f"{kind}{side}{lossy}.tls")
                    keys = [f"n{j // 1300:08d}/n{j // 1300:08d}_{j:05d}" for j in range(n)]
                    with StoreWriter(path, num_classes=num_classes, topk=topk, map_size=(side, side),
                                     lossy=lossy) as w:
                        w.add_batch(keys, v, i)
                    row[f"{kind}_{'lossy' if lossy else 'lossless'}"] = os.path.getsize(path) / n
            buf = io.BytesIO()
            torch.save(torch.stack([values[0].float(), indices[0].float()]).half(), buf)
            row["public_pt_bytes"] = len(buf.getvalue())
            rows.append(row)
    return rows


@torch.inference_mode()
def plain_loop(model, root: Path, paths, cfg: dict, dev: torch.device, *, batch_size: int, workers: int,
               amp: bool, channels_last: bool) -> dict:
    """The baseline: classify every image, keep the top-5 classes on the host."""
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(ResizedImages(root, paths, cfg["img_size"], cfg["interpolation"]),
                                         batch_size=batch_size, num_workers=workers, pin_memory=dev.type == "cuda")
    mean = torch.tensor(cfg["mean"], device=dev).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg["std"], device=dev).view(1, 3, 1, 1) * 255.0
    preds = []
    for images, _, _ in loader:
        x = images.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x.float() - mean) / std
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
            logits = model(x)
        preds.append(logits.float().topk(5, dim=1).indices.to("cpu", non_blocking=True))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"seconds": time.perf_counter() - t0, "images": sum(len(p) for p in preds)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", help="ImageFolder root (default: generate --num-images JPEGs under --work)")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tl_fast_bench_annotate"))
    p.add_argument("--model", default="resnet18", help="timm model name (random weights; speed only)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers, both runs")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--disk", action="store_true", help="only print the store's bytes per image by map size")
    harness.add_record_arguments(p)
    args = p.parse_args(argv)
    if args.disk:
        rows = disk_table(args.num_classes, args.topk)
        print(f"store bytes per image, top-{args.topk} of K={args.num_classes} (whole file / records; GB per million "
              "images = bytes / 1000)")
        print("map     public .pt  smooth lossless  smooth lossy  random lossless  random lossy")
        for r in rows:
            print(f"{r['map']:6s} {r['public_pt_bytes']:10,d} {r['smooth_lossless']:15,.0f} {r['smooth_lossy']:13,.0f} "
                  f"{r['random_lossless']:16,.0f} {r['random_lossy']:13,.0f}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        harness.record("annotate_throughput", disk_rows(rows, args), args, argv)
        return {"disk": rows}

    if args.threads:
        torch.set_num_threads(args.threads)
    # K=1000 over a folder of a few classes is intended here (speed only): no accuracy warning.
    logging.getLogger("tl_fast.annotate").setLevel(logging.ERROR)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both runs: what a plain GPU inference loop sets
    work = Path(args.work)
    root = Path(args.images) if args.images else make_images(work / f"images_{args.num_images}", args.num_images)
    imgs = list_images(root)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes, img_size=args.img_size).to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    cfg = data_config(model, args.img_size)
    store = work / "bench.tls"
    common = dict(batch_size=args.batch_size, amp=args.amp, channels_last=args.channels_last)

    def run_plain() -> dict:
        return plain_loop(model, imgs.root, imgs.paths, cfg, dev, workers=args.workers, **common)

    def run_annotate(profile: bool = False) -> dict:
        t0 = time.perf_counter()
        res = annotate(root, store, model=model, img_size=args.img_size, topk=args.topk, num_workers=args.workers,
                       device=dev, restart=True, progress=False, profile=profile, **common)
        seconds = time.perf_counter() - t0
        store.unlink()
        return {"seconds": seconds, "loop_seconds": res.loop_seconds, "images": res.rank_images,
                "stages": res.stage_seconds, "assemble_seconds": res.assemble_seconds, "map_size": res.map_size}

    print(f"{len(imgs)} images, {args.model} K={args.num_classes} at {args.img_size} px, batch {args.batch_size}, "
          f"{args.workers} workers, {args.device}{' bf16' if args.amp else ''}"
          f"{' channels-last' if args.channels_last else ''}; machine: {harness.machine_name(args.device)}", flush=True)
    run_plain(), run_annotate()  # warm-up: model, numba encoder, page cache
    rows = []
    for r in range(args.rounds):
        order = ("plain", "annotate") if r % 2 == 0 else ("annotate", "plain")
        row = {}
        for name in order:
            row[name] = run_plain() if name == "plain" else run_annotate()
        rows.append(row)
        pr = row["plain"]["images"] / row["plain"]["seconds"]
        ar = row["annotate"]["images"] / row["annotate"]["seconds"]
        print(f"round {r}: plain {pr:8.1f} img/s, annotate {ar:8.1f} img/s, ratio {ar / pr:.3f}", flush=True)
    if dev.type == "cuda":
        shares_from = [run_annotate(profile=True)]
    else:
        shares_from = [row["annotate"] for row in rows]

    n = len(imgs)
    plain_rate = statistics.median(n / row["plain"]["seconds"] for row in rows)
    ann_rate = statistics.median(n / row["annotate"]["seconds"] for row in rows)
    loop_rate = statistics.median(n / row["annotate"]["loop_seconds"] for row in rows)
    ratio = statistics.median(row["plain"]["seconds"] / row["annotate"]["seconds"] for row in rows)
    loop_ratio = statistics.median(row["plain"]["seconds"] / row["annotate"]["loop_seconds"] for row in rows)
    stages = {s: statistics.median(a["stages"][s] / a["seconds"] for a in shares_from)
              for s in shares_from[0]["stages"]}
    stages["setup + assembly"] = statistics.median(1 - a["loop_seconds"] / a["seconds"] for a in shares_from)
    out = {"machine": harness.machine_name(args.device), "load_average": os.getloadavg()[0], "args": vars(args),
           "images": n, "map_size": rows[0]["annotate"]["map_size"], "plain_img_s": plain_rate,
           "annotate_img_s": ann_rate, "annotate_loop_img_s": loop_rate, "ratio": ratio, "loop_ratio": loop_ratio,
           "stage_share_of_annotate": stages, "rounds": rows}
    print(f"\nplain timm loop   {plain_rate:8.1f} img/s")
    print(f"tl-fast annotate  {ann_rate:8.1f} img/s  (end to end)   ratio {ratio:.3f} (median of rounds)")
    print(f"  its loop alone  {loop_rate:8.1f} img/s                 ratio {loop_ratio:.3f}")
    print("share of annotate's time: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in stages.items())
          + "  (writer overlaps the loop)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    config = (f"{n} images, {args.model} K={args.num_classes} at {args.img_size} px, batch {args.batch_size}, "
              f"{args.workers} workers, {args.device}{' bf16' if args.amp else ''}"
              f"{' channels-last' if args.channels_last else ''}, torch threads {torch.get_num_threads()}; "
              f"{args.rounds} rounds")
    shares = {"stage_shares": {k: round(v, 4) for k, v in stages.items()}}
    rows = [harness.row(f"tl-fast annotate, {label}", config, rate, "images/s", target="annotate",
                        baseline="plain timm inference loop (same DataLoader, model, batch)", baseline_value=plain_rate,
                        ratio=r, ratio_of="median over rounds of plain seconds / annotate seconds",
                        goal=f">= {RATIO_TARGET}x" if whole else None, meets=r >= RATIO_TARGET,
                        **(shares if whole else {}))
            for label, rate, r, whole in (("end to end", ann_rate, ratio, True),
                                          ("its inference loop alone", loop_rate, loop_ratio, False))]
    harness.record("annotate_throughput", rows, args, argv, device=args.device)
    return out


def disk_rows(table: list[dict], args) -> list[dict]:
    """The store's bytes per image (whole file) against the public file, by map size."""
    out = []
    for r in table:
        for kind, label in (("smooth", "annotator-like maps"), ("random", "no spatial structure (worst case)")):
            for mode in ("lossless", "lossy"):
                value = r[f"{kind}_{mode}"]
                out.append(harness.row(f"store bytes per image, {mode}, {label}",
                                       f"{r['map']} top-{args.topk} K={args.num_classes}, whole file", value, "bytes",
                                       target="label-store", baseline="public .pt file",
                                       baseline_value=r["public_pt_bytes"], ratio=value / r["public_pt_bytes"],
                                       ratio_of="value / baseline", percent=True))
    return out


if __name__ == "__main__":
    main()
