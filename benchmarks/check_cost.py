"""Cost per image of the validity rule at indexing: the header-only index it replaced (PIL header
plus an end-of-image marker test), the quick check (the default: 1/8-scale libjpeg-turbo decode)
and the full check (``tl-fast check``), on ImageNet-sized JPEGs (500x375, quality 90), one thread,
interleaved rounds, medians. Run: python benchmarks/check_cost.py"""
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

from tl_fast.imagecheck import check_image


def header_only(path: str) -> None:
    with Image.open(path) as im:
        im.size
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        assert b"\xff\xd9" in f.read()


def main(n: int = 40, rounds: int = 5) -> None:
    rs = np.random.RandomState(0)
    folder = tempfile.mkdtemp()
    paths = []
    for i in range(n):
        img = Image.fromarray(rs.randint(0, 256, (375, 500, 3)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        paths.append(os.path.join(folder, f"{i}.jpg"))
        open(paths[-1], "wb").write(buf.getvalue())
    size = np.mean([os.path.getsize(p) for p in paths])
    ways = {"header only (old index)": header_only, "quick check (default)": lambda p: check_image(p),
            "full check (tl-fast check)": lambda p: check_image(p, full=True)}
    times = {k: [] for k in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            t = time.perf_counter()
            for p in paths:
                fn(p)
            times[name].append((time.perf_counter() - t) / n * 1e3)
    base = np.median(times["header only (old index)"])
    print(f"{n} JPEGs 500x375, mean {size / 1024:.0f} KB, ms per image (median of {rounds} rounds):")
    for name, ts in times.items():
        print(f"  {name:28s} {np.median(ts):6.3f} ms  ({np.median(ts) / base:.1f}x header only)")


if __name__ == "__main__":
    main()
