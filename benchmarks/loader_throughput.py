"""Loader throughput: images/s of every backend with token labels on and off, and of the public approach.

The public approach (LV-ViT's loader re-stated): PIL decode + timm/torchvision transforms with the same
augmentation (random resized crop, flip, RandAugment ``rand-m9-mstd0.5-inc1``, normalization, random
erasing 0.25 per pixel) and one ``torch.load`` of a ``[2, k, H, W]`` float16 ``.pt`` label file per
sample, in a ``DataLoader`` with the same worker count. tl_fast's loaders deliver the same images
(RandAugment, normalization and erasing on the device) plus the compressed maps on the device.

Runs are interleaved (every configuration once per round, in reverse order every other round,
``--rounds`` rounds); each run skips ``--warmup`` batches (worker start-up, FFCV compilation) and
times the next ``--batches``, or with ``--whole-epoch`` times one whole epoch from ``iter()``,
start-up included, as a trainer sees it. Reported: median images/s (20th / 80th percentiles),
labels-on / labels-off per backend (target >= 0.97) as the ratio of the medians and as the median
of each round's pair (the two runs are next to each other in a round), and the fastest backend over
the public approach (target >= 2).

    python -m benchmarks.loader_throughput                      # demo dataset (tl_fast.demo.prepare())
    python -m benchmarks.loader_throughput --images DIR --labels STORE --workers 8 --device cuda

Rows: labels on against off per backend, and each backend with labels on against the public approach
(``benchmarks/results/loader_throughput.json``).
"""
from __future__ import annotations

import os

# libgomp threads spin after each parallel region; with FFCV's numba threads or DataLoader workers
# on the same cores that spinning starves the decoders (10-100x slower on a 2-core host). Must be
# set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import harness  # noqa: E402
from tl_fast.dataset import ImageFolderIndex  # noqa: E402
from tl_fast.loaders import TokenLabelLoader  # noqa: E402

ON_OFF_TARGET = 0.97
PUBLIC_TARGET = 2.0


class PublicDataset(Dataset):
    """Per-sample PIL decode + transforms + ``torch.load`` of the sample's ``.pt`` label file."""

    def __init__(self, index: ImageFolderIndex, label_dir: str, transform) -> None:
        self.index, self.label_dir, self.transform = index, label_dir, transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        from PIL import Image

        with open(self.index.abspath(i), "rb") as f:
            img = Image.open(f).convert("RGB")
        label_map = torch.load(os.path.join(self.label_dir, self.index.keys[i] + ".pt"))
        return self.transform(img), int(self.index.targets[i]), label_map


def write_public_labels(index: ImageFolderIndex, store_path: str, out_dir: str) -> None:
    """The public per-image layout: ``out_dir/<class>/<image>.pt`` = ``[2, k, H, W]`` float16."""
    from tl_fast.store import LabelStore

    store = LabelStore.open(store_path)
    ids = store.lookup(index.keys)
    for start in tqdm(range(0, len(ids), 256), desc="writing public .pt labels", leave=False):
        maps = store.read(ids[start:start + 256])
        for j in range(maps.batch_size):
            key = index.keys[start + j]
            path = os.path.join(out_dir, key + ".pt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(torch.stack([maps.values[j], maps.indices[j].half()]), path)


def measure(iterable_factory, warmup: int, batches: int, device: torch.device, whole_epoch: bool = False,
            cpu: list | None = None) -> float:
    """Images/s over ``batches`` batches after ``warmup`` batches, or over one whole epoch from the
    call to ``iter`` (worker start-up included, as a trainer sees it). ``cpu``: gets this process's
    CPU milliseconds per image over the same window (all its threads; not worker processes)."""
    start = time.perf_counter() if whole_epoch else None
    cpu0 = time.process_time() if whole_epoch else None
    it = iter(iterable_factory())
    seen = 0
    for i, batch in enumerate(it):
        n = len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch)
        if whole_epoch:
            seen += n
            continue
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            cpu0 = time.process_time()
        elif i > warmup:
            seen += n
        if i == warmup + batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cpu is not None:
        cpu.append(1000 * (time.process_time() - cpu0) / max(seen, 1))
    if hasattr(it, "close"):
        it.close()
    return seen / elapsed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="ImageFolder directory (default: the demo dataset's train split)")
    p.add_argument("--labels", help="label store of --images")
    p.add_argument("--backends", default="torch,dali,ffcv")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--whole-epoch", action="store_true",
                   help="time whole epochs from iter() (worker start-up included) instead of --warmup/--batches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", help="where the .beton and the public .pt files go (default: a temp dir)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    harness.add_record_arguments(p)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)

    if args.images is None:
        from tl_fast.demo import prepare

        demo = prepare()
        images, labels = str(demo.train), str(demo.labels)
    else:
        images, labels = args.images, args.labels
        if labels is None:
            p.error("--labels is required with --images")
    workdir = args.workdir or tempfile.mkdtemp(prefix="tl_fast_loader_bench_")
    index = ImageFolderIndex(images)
    backends = [b for b in args.backends.split(",") if b]
    beton = os.path.join(workdir, "train.beton")
    if "ffcv" in backends and not os.path.exists(beton):
        from tl_fast.loaders.ffcv_pack import pack_ffcv

        pack_ffcv(images, labels, beton, num_workers=args.workers)
    public_dir = os.path.join(workdir, "public_labels")
    if not os.path.isdir(public_dir):
        write_public_labels(index, labels, public_dir)

    common = dict(batch_size=args.batch_size, image_size=args.image_size, num_workers=args.workers, device=device)
    loaders = {}
    for be in backends:
        for on in (False, True):
            src = beton if be == "ffcv" else images
            lab = None if be == "ffcv" else labels
            loaders[(be, on)] = TokenLabelLoader(src, lab, backend=be, token_labels=on, **common)
    n_needed = (args.warmup + args.batches + 1) * args.batch_size
    if not args.whole_epoch and len(index) < n_needed:
        raise SystemExit(f"{len(index)} images is too few for --warmup {args.warmup} --batches {args.batches} "
                         f"at --batch-size {args.batch_size} (need {n_needed})")

    from timm.data import create_transform

    # mmax9: Pillow >= 10 rejects timm's posterize to 0 bits (magnitude 10); capping at 9 avoids it.
    transform = create_transform(args.image_size, is_training=True, auto_augment="rand-m9-mstd0.5-mmax9-inc1",
                                 interpolation="bilinear", re_prob=0.25, re_mode="pixel", re_count=1)
    public = PublicDataset(index, public_dir, transform)

    def public_loader():
        """As a trainer consumes it: every batch is moved to the device (tl_fast's loaders deliver there)."""
        loader = DataLoader(public, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=True, pin_memory=device.type == "cuda", persistent_workers=False)
        for images, targets, label_maps in loader:
            yield (images.to(device, non_blocking=True), targets.to(device, non_blocking=True),
                   label_maps.to(device, non_blocking=True))

    rates: dict = {key: [] for key in list(loaders) + ["public"]}
    runs = list(loaders) + ["public"]
    for r in tqdm(range(args.rounds), desc="rounds"):
        # Odd rounds run in reverse order, so no configuration always follows the same one (the
        # previous run's workers shutting down, a warm page cache).
        for key in runs if r % 2 == 0 else runs[::-1]:
            if key == "public":
                rates[key].append(measure(public_loader, args.warmup, args.batches, device, args.whole_epoch))
                continue
            loader = loaders[key]
            loader.set_epoch(1000 + r)
            rates[key].append(measure(lambda: loader, args.warmup, args.batches, device, args.whole_epoch))
    # What token labels add per batch, timed directly (robust where the images/s are noisy).
    label_ms = {be: 1e3 * loaders[(be, True)].stats["label_s"] / max(1, loaders[(be, True)].stats["batches"])
                for be in backends}

    def stat(v):
        return tuple(harness.spread(v).values())  # median, p20, p80

    def paired(be) -> float:
        """Median over rounds of labels-on / labels-off, the two runs next to each other in a round:
        a drift of the machine's speed between rounds cancels out."""
        return statistics.median(a / b for a, b in zip(rates[(be, True)], rates[(be, False)]))

    pub = stat(rates["public"])[0]
    dev_name = harness.machine(device.type)["gpu"] or harness.cpu_model()
    window = "whole epochs" if args.whole_epoch else f"{args.batches} batches"
    print(f"\nloader throughput, images/s (median [p20, p80] of {args.rounds} rounds x {window}), "
          f"{len(index)} images, batch {args.batch_size}, {args.image_size}px, {args.workers} workers, "
          f"device {device} ({dev_name}), {os.cpu_count()} CPUs")
    print(f"{'backend':<8} {'labels off':>22} {'labels on':>22} {'on/off (>=0.97)':>16} {'paired':>7} "
          f"{'on vs public':>13} {'label ms/batch':>15} {'label share':>12}")
    best = 0.0
    for be in backends:
        off, on = stat(rates[(be, False)]), stat(rates[(be, True)])
        best = max(best, on[0])
        print(f"{be:<8} {off[0]:8.1f} [{off[1]:6.1f},{off[2]:6.1f}] {on[0]:8.1f} [{on[1]:6.1f},{on[2]:6.1f}] "
              f"{on[0] / off[0]:16.3f} {paired(be):7.3f} {on[0] / pub:12.2f}x {label_ms[be]:15.3f} "
              f"{label_ms[be] / (1e3 * args.batch_size / off[0]):11.2%}")
    pb = stat(rates["public"])
    print(f"{'public':<8} {'':>22} {pb[0]:8.1f} [{pb[1]:6.1f},{pb[2]:6.1f}] {'':>16} {1.0:12.2f}x")
    print(f"fastest backend with token labels vs public: {best / pub:.2f}x (target >= {PUBLIC_TARGET:.0f}x)")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "cpus": os.cpu_count(), "args": vars(args), "public": stat(rates["public"]),
                       "backends": {be: {"off": stat(rates[(be, False)]), "on": stat(rates[(be, True)]),
                                         "paired_on_off": paired(be), "label_ms_per_batch": label_ms[be],
                                         "rounds": {"off": rates[(be, False)], "on": rates[(be, True)]}}
                                    for be in backends},
                       "public_rounds": rates["public"],
                       "fastest_vs_public": best / pub}, f, indent=1)
        from benchmarks.plots import save_bars

        png = save_bars(os.path.splitext(args.json)[0] + ".png",
                        f"loader throughput, {args.image_size}px, batch {args.batch_size}, {args.workers} workers, "
                        f"{dev_name}", "images/s", backends + ["public"],
                        {"labels off": [stat(rates[(be, False)]) for be in backends] + [None],
                         "labels on": [stat(rates[(be, True)]) for be in backends] + [pb]})
        if png:
            print(f"picture: {png}")
    print("paired = median over rounds of labels-on / labels-off run back to back; label share = label-side host "
          "time per batch / batch time at the labels-off rate; labels-on / labels-off is bounded below by "
          "1 / (1 + share) up to measurement noise")
    window = "whole epochs" if args.whole_epoch else f"{args.warmup} warm-up + {args.batches} timed batches"
    config = (f"{len(index)} images, batch {args.batch_size}, {args.image_size} px, {args.workers} workers, "
              f"device {device.type}, full recipe; {args.rounds} rounds x {window}")
    rows = []
    for be in backends:
        off, on = stat(rates[(be, False)]), stat(rates[(be, True)])
        share = label_ms[be] / (1e3 * args.batch_size / off[0])
        rows.append(harness.row(
            f"{be} backend, token labels on vs off", config, on[0], "images/s", target="loader-labels-on-off",
            spread_of={"p20": on[1], "p80": on[2]}, baseline=f"{be} backend, token labels off", baseline_value=off[0],
            ratio=on[0] / off[0], ratio_of="value / baseline", goal=f">= {ON_OFF_TARGET}",
            meets=on[0] / off[0] >= ON_OFF_TARGET, paired_on_off=paired(be), label_ms_per_batch=label_ms[be],
            label_share=share))
        rows.append(harness.row(
            f"{be} backend, token labels on, vs the public loader", config, on[0], "images/s",
            target="loader-vs-peers", spread_of={"p20": on[1], "p80": on[2]},
            baseline="public: PIL + timm transforms + one torch.load per sample, same workers", baseline_value=pub,
            ratio=on[0] / pub, ratio_of="value / baseline", goal=f">= {PUBLIC_TARGET:.0f}x (the fastest backend)",
            meets=on[0] / pub >= PUBLIC_TARGET))
    harness.record("loader_throughput", rows, args, argv, device=device.type)


if __name__ == "__main__":
    main()
