"""Cost of the FFCV backend's whole-byte image check against the decode it guards, in one run.

Per packed ImageNet-sized JPEG (500x375, quality 90): FFCV's full-size JPEG decode
(``ffcv.libffcv.imdecode``, what the plan-crop decoder runs before its crop), the content hash the
pipeline's read computes over every byte (:func:`tl_fast.loaders.packed_hash.content_hash`), the
two-window hash it replaces (first and last 2 KB), and the hash followed by the decode (what the
pipeline runs: the hash brings the bytes into the cache the decode then reads). One thread, bytes in
a memory-mapped file (page cache), interleaved rounds, medians with 20th-80th percentiles.
Run: python benchmarks/beton_hash_cost.py [--n 64 --rounds 7 --blur 1.0]"""
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


if __name__ == "__main__":
    main()
