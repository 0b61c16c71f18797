"""Experiment (2026-12-01): per-batch cost of the bad-input checks on the loaders' hot paths (B=128,
ImageNet-sized JPEGs): the store's stat before each batch read, and the FFCV backend's fingerprints of a
batch's packed images (format version 3). Result: docs/image-checks.md.
Run: PYTHONPATH=. python experiments/check_overhead.py (medians of many calls, microseconds)."""
import os
import tempfile
import time

import numpy as np

from tl_fast.imagecheck import packed_fingerprints

B = 128
PATH = os.path.join(tempfile.mkdtemp(), "blob.bin")
buf = np.memmap(PATH, dtype=np.uint8, mode="w+", shape=(B * 110_000,))
buf[:] = 7
buf.flush()
mm = np.memmap(PATH, dtype=np.uint8, mode="r")
offs = np.arange(B, dtype=np.int64) * 110_000
sizes = np.full(B, 110_000, np.int64)
packed_fingerprints(mm, offs, sizes)
def med(fn, n=2000):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e6
st = med(lambda: os.stat(PATH))
fp = med(lambda: packed_fingerprints(mm, offs, sizes), 500)
print(f"os.stat per batch: {st:.1f} us; fingerprints of {B} packed images: {fp:.1f} us")
os.remove(PATH)
