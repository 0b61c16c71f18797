"""Experiment (2026-12-02): cost per image of the validity rule at indexing, against the header-only index it replaced, and
of the cheaper decodes that could stand in for it, on ImageNet-sized JPEGs (500x375, quality 90),
one thread, interleaved rounds, medians.

Each way is also run on the bad JPEGs of tests/test_bad_input.py (a truncated file with ``FF D9``
appended, random bytes in the middle of the scan): a way that delivers pixels for either cannot be
the default, whatever it costs. Result: docs/image-checks.md.
Run: PYTHONPATH=. python experiments/check_cost.py [--n 40 --rounds 7]"""
from __future__ import annotations

import argparse
import ctypes
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

from tl_fast import imagecheck
from tl_fast.imagecheck import check_image


def header_only(data: bytes) -> bool:
    """The index before issue 16: PIL header plus an end-of-image marker test."""
    with Image.open(io.BytesIO(data)) as im:
        im.size
    return b"\xff\xd9" in data[-4096:]


def pil_then_turbo_rgb8(data: bytes) -> bool:
    """The quick check before this change: PIL header, then a 1/8-scale RGB libjpeg-turbo decode."""
    with Image.open(io.BytesIO(data)) as im:
        im.size
    turbo = imagecheck._TURBO
    h = turbo._handle()
    w, ht, sub, cs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    turbo.lib.tjDecompressHeader3(h, data, len(data), ctypes.byref(w), ctypes.byref(ht), ctypes.byref(sub),
                                  ctypes.byref(cs))
    ow, oh = -(-w.value // 8), -(-ht.value // 8)
    out = np.empty(ow * oh * 3, np.uint8)
    return turbo.lib.tjDecompress2(h, data, len(data), out.ctypes.data, ow, 0, oh, 0, 8192 | 2048) == 0


def pil_draft8(data: bytes) -> bool:
    """PIL's reduced-scale JPEG decode (``draft``), which fails only on errors, not warnings."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
        return True
    except Exception:
        return False


def opencv_reduced8(data: bytes) -> bool:
    """OpenCV's ``IMREAD_REDUCED_GRAYSCALE_8`` (libjpeg warnings go to stderr only)."""
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None


def _bad_jpegs() -> dict[str, bytes]:
    img = np.random.RandomState(0).randint(0, 256, size=(96, 128, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    good = buf.getvalue()
    mid = bytearray(good)
    mid[len(good) // 2:len(good) // 2 + 64] = np.random.RandomState(1).randint(0, 256, 64).astype(np.uint8).tobytes()
    return {"truncated + FF D9": good[: len(good) // 2] + b"\xff\xd9", "noise in the scan": bytes(mid)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    rs = np.random.RandomState(0)
    folder = tempfile.mkdtemp()
    paths = []
    for i in range(args.n):
        img = Image.fromarray(rs.randint(0, 256, (375, 500, 3)).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        paths.append(os.path.join(folder, f"{i}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(buf.getvalue())
    size = np.mean([os.path.getsize(p) for p in paths])

    def on_file(fn):
        def run(path):
            with open(path, "rb") as f:
                return fn(f.read())
        return run

    bad = _bad_jpegs()
    ways = {
        "header only (old index)": (on_file(header_only), lambda d: header_only(d)),
        "PIL draft 1/8": (on_file(pil_draft8), pil_draft8),
        "OpenCV IMREAD_REDUCED_GRAYSCALE_8": (on_file(opencv_reduced8), opencv_reduced8),
        "PIL header + turbo 1/8 RGB (previous default)": (on_file(pil_then_turbo_rgb8), pil_then_turbo_rgb8),
        "quick check (default: turbo 1/8 grey)": (check_image, None),
        "full check (tl-fast check)": (lambda p: check_image(p, full=True), None),
    }
    catches = {}
    for name, (_, on_bytes) in ways.items():
        if on_bytes is None:
            problems = []
            for label, data in bad.items():
                p = os.path.join(folder, "bad.jpg")
                with open(p, "wb") as f:
                    f.write(data)
                problems.append(check_image(p, full="full" in name).problem != "")
            catches[name] = all(problems)
        else:
            catches[name] = not any(on_bytes(d) for d in bad.values())
    times = {k: [] for k in ways}
    for fn, _ in ways.values():
        fn(paths[0])  # warm-up (numba, libraries)
    for _ in range(args.rounds):
        for name, (fn, _) in ways.items():
            t = time.perf_counter()
            for p in paths:
                fn(p)
            times[name].append((time.perf_counter() - t) / args.n * 1e3)
    base = np.median(times["header only (old index)"])
    prev = np.median(times["PIL header + turbo 1/8 RGB (previous default)"])
    print(f"{args.n} JPEGs 500x375, mean {size / 1024:.0f} KB, ms per image (median of {args.rounds} rounds, "
          f"20th-80th percentile):")
    for name, ts in times.items():
        m = np.median(ts)
        lo, hi = np.percentile(ts, [20, 80])
        print(f"  {name:46s} {m:6.3f} ms [{lo:.3f}-{hi:.3f}]  {m / base:5.1f}x header only  {m / prev:4.2f}x previous"
              f"  catches both bad JPEGs: {'yes' if catches[name] else 'NO'}")


if __name__ == "__main__":
    main()
