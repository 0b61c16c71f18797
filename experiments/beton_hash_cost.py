"""Experiment (2026-12-02): cost of the FFCV backend's whole-byte image check against the decode it
guards, in one run. Result: docs/image-checks.md.

Per packed ImageNet-sized JPEG (500x375, quality 90): FFCV's full-size JPEG decode
(``ffcv.libffcv.imdecode``, what the plan-crop decoder runs before its crop), the content hash the
pipeline's read computes over every byte (:func:`tl_fast.loaders.packed_hash.content_hash`), the
two-window hash it replaces (first and last 2 KB), and the hash followed by the decode (what the
pipeline runs: the hash brings the bytes into the cache the decode then reads). One thread, bytes in
a memory-mapped file (page cache), interleaved rounds, medians with 20th-80th percentiles.
``--loader``: also whole FFCV loader epochs over a packed folder of such images (crop + flip, no
labels), with the check and with it switched off, interleaved.
Run: PYTHONPATH=. python experiments/beton_hash_cost.py [--n 64 --rounds 7 --blur 1.0] [--loader --workers 2]"""
from __future__ import annotations

import argparse
import io
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

from tl_fast.imagecheck import packed_fingerprints
from tl_fast.loaders.packed_hash import content_hash, packed_content_hashes


def main() -> None:
    from ffcv.libffcv import imdecode

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--blur", type=float, default=1.0, help="Gaussian blur of the noise images (less: larger files)")
    ap.add_argument("--loader", action="store_true", help="also time FFCV loader epochs with and without the check")
    ap.add_argument("--workers", type=int, default=2, help="FFCV decoder threads for --loader")
    args = ap.parse_args()
    rs = np.random.RandomState(0)
    blobs = []
    for _ in range(args.n):
        img = Image.fromarray(rs.randint(0, 256, (375, 500, 3)).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(args.blur))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    sizes = np.array([len(b) for b in blobs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) + 3  # unaligned, like a .beton
    path = tempfile.mktemp(suffix=".bin")
    with open(path, "wb") as f:
        f.write(b"\0" * 3 + b"".join(blobs))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    dst = np.empty((375, 500, 3), np.uint8)
    views = [mm[o:o + s] for o, s in zip(offsets, sizes)]

    def decode():
        for v in views:
            imdecode(v, dst, 375, 500, 375, 500, 0, 0, 1, 1, False, False)

    def hash_then_decode():  # what the pipeline does: its read hashes, then the decoder decodes
        for v in views:
            content_hash(v)
            imdecode(v, dst, 375, 500, 375, 500, 0, 0, 1, 1, False, False)

    def whole():
        for v in views:
            content_hash(v)

    def windows():
        packed_fingerprints(mm, offsets, sizes)

    packed_content_hashes(mm, offsets, sizes)
    ways = {"FFCV full-size decode (imdecode)": decode, "hash, then decode (the pipeline)": hash_then_decode,
            "content hash, every byte (version 4)": whole,
            "two 2 KB windows (version 3)": windows}
    for fn in ways.values():
        fn()
    times = {k: [] for k in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) / args.n * 1e6)
    base = np.median(times["FFCV full-size decode (imdecode)"])
    print(f"{args.n} JPEGs 500x375, mean {sizes.mean() / 1024:.0f} KB; us per image (median of {args.rounds} rounds, "
          "20th-80th percentile):")
    for name, ts in times.items():
        m = np.median(ts)
        lo, hi = np.percentile(ts, [20, 80])
        print(f"  {name:38s} {m:9.2f} us [{lo:.2f}-{hi:.2f}]  {100 * m / base:6.2f}% of the decode")
    hash_ts = np.median(times["content hash, every byte (version 4)"])
    print(f"  content hash throughput: {sizes.mean() / hash_ts / 1e3:.1f} GB/s")
    if args.loader:
        loader_epochs(blobs, args)


def loader_epochs(blobs: list[bytes], args) -> None:
    """Median epoch time of two FFCV loaders on one ``.beton``, one with its check switched off."""
    import os
    import warnings

    from tl_fast.loaders import TokenLabelLoader
    from tl_fast.loaders.ffcv_pack import pack_ffcv
    from tl_fast.loaders.packed_hash import EMPTY_HASHES
    from tl_fast.plan import AugmentConfig

    root = tempfile.mkdtemp()
    for i, b in enumerate(blobs):
        os.makedirs(os.path.join(root, "c"), exist_ok=True)
        with open(os.path.join(root, "c", f"{i:04d}.jpg"), "wb") as f:
            f.write(b)
    beton = os.path.join(root, "x.beton")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_ffcv(root, None, beton, num_workers=1, progress=False)
    kw = dict(backend="ffcv", batch_size=32, image_size=224, num_workers=args.workers, device="cpu", labels=None,
              augment=AugmentConfig(randaugment=None), erase=None, drop_last=False)
    on, off = TokenLabelLoader(beton, **kw), TokenLabelLoader(beton, **kw)
    for loader in (on, off):
        list(loader)  # compiles the pipeline
    off._backend._loader.memory_manager.expected_hashes = EMPTY_HASHES  # nothing recorded: nothing hashed
    times = {"with the check": [], "check off": []}
    for _ in range(args.rounds):
        for name, loader in (("with the check", on), ("check off", off)):
            t = time.perf_counter()
            for _batch in loader:
                pass
            times[name].append((time.perf_counter() - t) / len(blobs) * 1e3)
    base = np.median(times["check off"])
    print(f"FFCV loader epochs ({len(blobs)} images, batch 32, 224 px, {args.workers} decoder threads), "
          "ms per image (median, 20th-80th percentile):")
    for name, ts in times.items():
        lo, hi = np.percentile(ts, [20, 80])
        print(f"  {name:16s} {np.median(ts):7.3f} ms [{lo:.3f}-{hi:.3f}]  {np.median(ts) / base:.3f}x check off")


if __name__ == "__main__":
    main()
