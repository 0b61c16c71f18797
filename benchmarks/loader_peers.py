"""tl_fast's loaders against the native pipelines users run today, in one run.

Two recipes, each on the same images at the same size, batch and worker count:

* ``crop-flip``: random resized crop + horizontal flip + normalization. tl_fast's three backends
  (token labels off and on) against native FFCV (its own ``.beton`` from FFCV's writer, its
  ``RandomResizedCropRGBImageDecoder`` and flip), native DALI (``fn.readers.file`` +
  ``decoders.image_random_crop`` + ``resize`` + ``crop_mirror_normalize``) and torchvision
  (``ImageFolder`` + ``transforms.v2`` in a ``DataLoader``), all without labels.
* ``full``: the LV-ViT recipe (RandAugment ``rand-m9-mstd0.5-mmax9-inc1``, random erasing 0.25).
  tl_fast's backends against timm's ``create_transform`` in a ``DataLoader`` and DALI's
  ``auto_aug.rand_augment`` (n=2, m=9; DALI has no random erasing with timm's semantics, so that peer
  does less work).

Every configuration runs once per round, in reverse order every other round; each run skips
``--warmup`` batches and times ``--batches``. Reported: median images/s with 20th/80th percentiles,
tl_fast with labels on over the native peer (target >= 1.0 for FFCV and DALI) as the ratio of the
medians and as the median of each round's ratio (the two runs of a round are minutes apart at most,
so a drift of a shared machine's speed cancels out), and the CPU
milliseconds per image the pipeline's process spent over the timed batches (every thread of DALI's and
FFCV's pipelines; not DataLoader worker processes), the figure a busy machine moves least.

Each native peer runs in a process of its own (spawned, built once, measured on request, in the
same interleaved rounds), so it is measured as it runs without tl_fast in the process, and FFCV's
own loader (which mutates numba's shared types) cannot reach tl_fast's loaders either.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.loader_peers --batch-size 32 --workers 2 \\
        --json peers.json                     # demo dataset; writes peers.json and peers-*.png

Rows: each tl_fast backend with labels on against its native peer
(``benchmarks/results/loader_peers.json``).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see loader_throughput.py

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import traceback  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.loader_throughput import measure  # noqa: E402
from tl_fast.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tl_fast.loaders import TokenLabelLoader  # noqa: E402
from tl_fast.plan import AugmentConfig  # noqa: E402

RECIPES = ("crop-flip", "full")
RAND_AUGMENT = "rand-m9-mstd0.5-mmax9-inc1"  # mmax9: Pillow >= 10 rejects posterize to 0 bits
MEAN255 = [255 * m for m in IMAGENET_MEAN]
STD255 = [255 * s for s in IMAGENET_STD]


def ffcv_native(images: str, workdir: str, args):
    """FFCV's own pipeline: its writer (JPEG, quality 90), random resized crop decoder, flip."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    path = os.path.join(workdir, "native.beton")
    if not os.path.exists(path):
        writer = DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()},
                               num_workers=args.workers)
        writer.from_indexed_dataset(ImageFolder(images))
    # NormalizeImage before ToTensor: the documented order (ToTensor, ToTorchImage, NormalizeImage)
    # hangs while the pipeline is built on a CPU (FFCV issue 396).
    pipelines = {
        "image": [RandomResizedCropRGBImageDecoder((args.image_size, args.image_size)), RandomHorizontalFlip(),
                  NormalizeImage(np.array(MEAN255), np.array(STD255), np.float32), ToTensor(), ToTorchImage()],
        "label": [IntDecoder(), ToTensor(), Squeeze()],
    }
    loader = Loader(path, batch_size=args.batch_size, num_workers=args.workers, order=OrderOption.RANDOM,
                    drop_last=True, pipelines=pipelines, os_cache=True)
    return lambda: loader


def dali_native(images: str, args, rand_augment: bool):
    """DALI's own pipeline on the CPU: file reader, fused decode + random crop, resize, flip + normalize."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=args.batch_size, num_threads=args.workers, device_id=None, seed=0,
                  enable_conditionals=rand_augment)  # DALI's auto_aug selects operations by `if`
    def pipe():
        jpegs, labels = fn.readers.file(file_root=images, random_shuffle=True, name="Reader")
        imgs = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
                                             random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        imgs = fn.resize(imgs, resize_x=args.image_size, resize_y=args.image_size)
        if rand_augment:
            from nvidia.dali.auto_aug import rand_augment as ra

            imgs = ra.rand_augment(imgs, n=2, m=9)
        imgs = fn.crop_mirror_normalize(imgs, dtype=types.FLOAT, output_layout="CHW", mean=MEAN255, std=STD255,
                                        mirror=fn.random.coin_flip())
        return imgs, labels

    p = pipe()
    p.build()
    it = DALIGenericIterator(p, ["images", "labels"], reader_name="Reader", auto_reset=True,
                             last_batch_policy=LastBatchPolicy.DROP)

    def batches():
        for out in it:
            yield out[0]["images"], out[0]["labels"]

    return batches


def torchvision_native(images: str, args, full: bool):
    """ImageFolder in a DataLoader: transforms.v2 (crop-flip) or timm's training transform (full)."""
    from torchvision.datasets import ImageFolder

    if full:
        from timm.data import create_transform

        transform = create_transform(args.image_size, is_training=True, auto_augment=RAND_AUGMENT,
                                     interpolation="bilinear", re_prob=0.25, re_mode="pixel", re_count=1)
    else:
        from torchvision.transforms import v2

        transform = v2.Compose([v2.RandomResizedCrop(args.image_size, antialias=True), v2.RandomHorizontalFlip(),
                                v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = ImageFolder(images, transform=transform)
    return lambda: DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              drop_last=True)


def build(images: str, labels: str, beton: str, workdir: str, args) -> dict:
    """``{(recipe, name): tl_fast loader or PeerProcess}`` for every configuration of the run."""
    runs = {}
    common = dict(batch_size=args.batch_size, image_size=args.image_size, num_workers=args.workers, device="cpu")
    peers = {"crop-flip": (("ffcv", "FFCV native", "ffcv"), ("dali", "DALI native", "dali"),
                           (None, "torchvision", "torchvision")),
             "full": (("dali", "DALI rand_augment", "dali_rand_augment"), (None, "timm", "timm"))}
    try:
        for recipe in args.recipes:
            extra = {} if recipe == "full" else dict(augment=AugmentConfig(randaugment=None), erase=None)
            for be in args.backends:
                for on in (False, True):
                    loader = TokenLabelLoader(beton if be == "ffcv" else images, None if be == "ffcv" else labels,
                                              backend=be, token_labels=on, **common, **extra)
                    runs[(recipe, f"tl_fast {be}, labels {'on' if on else 'off'}")] = loader
            for needs, name, kind in peers[recipe]:
                if needs is None or needs in args.backends:
                    runs[(recipe, name)] = PeerProcess(kind, images, workdir, args)
    except BaseException:
        close_peers(runs)
        raise
    return runs


def close_peers(runs: dict) -> None:
    for run in runs.values():
        if isinstance(run, PeerProcess):
            run.close()


def _native(kind: str, images: str, workdir: str, args):
    """The iterable factory of the native pipeline ``kind``."""
    if kind == "ffcv":
        return ffcv_native(images, workdir, args)
    if kind.startswith("dali"):
        return dali_native(images, args, rand_augment=kind == "dali_rand_augment")
    return torchvision_native(images, args, full=kind == "timm")


def _peer_main(conn, kind: str, images: str, workdir: str, options: dict) -> None:
    """A peer's process: build the pipeline, then answer ``(warmup, batches)`` with ``(images/s, CPU
    ms per image)`` until told ``None``."""
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        factory = _native(kind, images, workdir, argparse.Namespace(**options))
        conn.send("ready")
        while (job := conn.recv()) is not None:
            cpu: list = []
            rate = measure(factory, job[0], job[1], torch.device("cpu"), cpu=cpu)
            conn.send((rate, cpu[0]))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


class PeerProcess:
    """A native pipeline in a spawned process of its own, built once and measured on request."""

    def __init__(self, kind: str, images: str, workdir: str, args) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        # Not a daemon: the torchvision and timm peers start DataLoader workers of their own.
        self.proc = ctx.Process(target=_peer_main, args=(child, kind, images, workdir, vars(args)))
        self.proc.start()
        self._reply()

    def _reply(self):
        msg = self.conn.recv()
        if isinstance(msg, tuple) and msg[0] == "error":
            self.proc.join(10)
            raise RuntimeError(f"native {self.kind} peer failed:\n{msg[1]}")
        return msg

    def measure(self, warmup: int, batches: int, cpu: list) -> float:
        self.conn.send((warmup, batches))
        rate, ms = self._reply()
        cpu.append(ms)
        return rate

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()


PEERS = {("crop-flip", "ffcv"): "FFCV native", ("crop-flip", "dali"): "DALI native",
         ("crop-flip", "torch"): "torchvision", ("full", "dali"): "DALI rand_augment", ("full", "torch"): "timm",
         ("full", "ffcv"): "timm"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="ImageFolder directory (default: the demo dataset's train split)")
    p.add_argument("--labels", help="label store of --images")
    p.add_argument("--backends", default="torch,dali,ffcv", help="tl_fast backends (their native peers follow)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="crop-flip, full, or both")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=48, help="timed batches per run (a run of 16 takes 0.3 s here: "
                   "too short for a shared machine)")
    p.add_argument("--workdir", help="where the .beton files go (default: a temp dir)")
    p.add_argument("--json", help="also write the figures to this JSON file (and a PNG beside it)")
    harness.add_record_arguments(p)
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.recipes = [r for r in args.recipes.split(",") if r]
    if bad := [r for r in args.recipes if r not in RECIPES]:
        p.error(f"unknown recipe {bad[0]!r}; choose from {', '.join(RECIPES)}")
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.images is None:
        from tl_fast.demo import prepare

        demo = prepare()
        images, labels = str(demo.train), str(demo.labels)
    elif args.labels is None:
        p.error("--labels is required with --images")
    else:
        images, labels = args.images, args.labels
    workdir = args.workdir or tempfile.mkdtemp(prefix="tl_fast_peers_")
    beton = os.path.join(workdir, "train.beton")
    if "ffcv" in args.backends and not os.path.exists(beton):
        from tl_fast.loaders.ffcv_pack import pack_ffcv

        pack_ffcv(images, labels, beton, num_workers=args.workers, progress=False)

    runs = build(images, labels, beton, workdir, args)
    order = list(runs)
    rates = {key: [] for key in order}
    # CPU ms per image of the pipeline's process over the timed batches (all its threads: DALI's and
    # FFCV's pipelines run there; DataLoader worker processes are not counted): what a pipeline costs
    # apart from how busy the machine is.
    cpu_ms = {key: [] for key in order}
    device = torch.device("cpu")
    try:
        for r in tqdm(range(args.rounds), desc="rounds"):
            for key in order if r % 2 == 0 else order[::-1]:
                run = runs[key]
                if isinstance(run, TokenLabelLoader):
                    run.set_epoch(1000 + r)
                    rates[key].append(measure(lambda: run, args.warmup, args.batches, device, cpu=cpu_ms[key]))
                else:
                    rates[key].append(run.measure(args.warmup, args.batches, cpu_ms[key]))
    finally:
        close_peers(runs)

    def stat(v):
        return tuple(harness.spread(v).values())  # median, p20, p80

    print(f"\nloaders vs native pipelines, images/s (median [p20, p80] of {args.rounds} rounds x {args.batches} "
          f"batches), batch {args.batch_size}, {args.image_size}px, {args.workers} workers, {os.cpu_count()} CPUs")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'recipe':<10} {'pipeline':<28} {'images/s':>24} {'labels on / peer: medians, paired':>44} "
          f"{'CPU ms/img':>11}")
    ratios = {}
    for recipe, name in order:
        m, lo, hi = stat(rates[(recipe, name)])
        ratio = ""
        if name.startswith("tl_fast ") and name.endswith("labels on"):
            peer = PEERS.get((recipe, name.split()[1].rstrip(",")))
            if (recipe, peer) in rates:
                paired = statistics.median(a / b for a, b in zip(rates[(recipe, name)], rates[(recipe, peer)]))
                ratios[(recipe, name)] = (m / stat(rates[(recipe, peer)])[0], paired)
                ratio = f"{ratios[(recipe, name)][0]:.2f}, {paired:.2f} vs {peer}"
        cpu = statistics.median(cpu_ms[(recipe, name)])
        print(f"{recipe:<10} {name:<28} {m:9.1f} [{lo:6.1f},{hi:6.1f}] {ratio:>44} {cpu:11.2f}")
    harness.record("loader_peers", rows(args, order, rates, cpu_ms, ratios), args, argv)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpus": os.cpu_count(),
                       "runs": [{"recipe": rc, "pipeline": nm, "stat": stat(rates[(rc, nm)]), "rounds": rates[(rc, nm)],
                         "cpu_ms_per_image": statistics.median(cpu_ms[(rc, nm)]),
                         "on_over_peer": ratios.get((rc, nm))}
                                for rc, nm in order]}, f, indent=1)
        from benchmarks.plots import save_bars

        for recipe in args.recipes:
            names = [nm for rc, nm in order if rc == recipe]
            png = save_bars(f"{os.path.splitext(args.json)[0]}-{recipe}.png",
                            f"{recipe}: loaders vs native pipelines, {args.image_size}px, batch {args.batch_size}, "
                            f"{args.workers} workers", "images/s",
                            [nm.replace("tl_fast ", "").replace(", labels ", "\nlabels ") for nm in names],
                            {"images/s": [stat(rates[(recipe, nm)]) for nm in names]})
            if png:
                print(f"picture: {png}")


def rows(args, order: list, rates: dict, cpu_ms: dict, ratios: dict) -> list[dict]:
    """tl_fast with labels on against each native peer (goal >= 1.0 against native FFCV and DALI)."""
    window = f"{args.rounds} rounds x {args.warmup} warm-up + {args.batches} timed batches"
    out = []
    for (recipe, name), (ratio, paired) in ratios.items():
        peer = PEERS[(recipe, name.split()[1].rstrip(","))]
        native = peer in ("FFCV native", "DALI native")
        on, base = harness.spread(rates[(recipe, name)]), harness.spread(rates[(recipe, peer)])
        config = (f"{RECIPE_NAMES[recipe]}; batch {args.batch_size}, {args.image_size} px, {args.workers} workers, "
                  f"CPU pipelines; {window}")
        out.append(harness.row(
            f"{name} vs {peer} without labels", config, on["median"], "images/s",
            target="loader-vs-peers", spread_of=on, baseline=f"{peer}, no labels", baseline_value=base["median"],
            ratio=ratio, ratio_of="value / baseline", goal=">= 1.0x" if native else None, meets=ratio >= 1.0,
            paired_ratio=paired, cpu_ms_per_image=statistics.median(cpu_ms[(recipe, name)]),
            peer_cpu_ms_per_image=statistics.median(cpu_ms[(recipe, peer)])))
    return out


RECIPE_NAMES = {"crop-flip": "crop + flip + normalize", "full": f"full recipe ({RAND_AUGMENT}, erasing 0.25)"}


if __name__ == "__main__":
    main()
