"""ImageNet-scale figures of the host-side tools: indexing, convert-pt, the store's writer, gathers, verify.

Builds in ``--workdir`` (default: a temp dir; about 5 GB at the default sizes):

* an ImageFolder of ``--images`` files (default 100,000) in 1,000 class folders, hard links to the
  demo dataset's JPEGs, indexed by ``ImageFolderIndex`` with an empty index cache;
* ``--pt-files`` public label files (``<class>/<image>.pt``, hard links to one real ``torch.save``
  file), converted by ``convert_pt`` with the default worker count and with one worker per core;
* a lossless store of ``--records`` records (default 1,281,167, ImageNet-1k's train split; 18x18
  top-5 maps of K=1000, cycling through 1,024 distinct annotator-like maps), written with
  ``StoreWriter``; then random batched gathers (batch 128) from it and from a cache-sized store
  (``--small-records``), with the file-backed memory each gathered record pulls in, and ``verify()``.

    python benchmarks/scale_check.py [--parts index,convert,store] [--workdir DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from tl_fast.store import LabelStore, StoreWriter
from tl_fast.store.synthetic import synthetic_topk_maps

PARTS = ("index", "convert", "store")
IMAGENET_TRAIN = 1_281_167


def _rss_file_kb() -> int:
    """File-backed resident memory of this process (kB), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return 0


def _folder(root: str, n: int, per_class: int, sources: list[str], ext: str) -> None:
    for i in range(n):
        d = os.path.join(root, f"c{i // per_class:04d}")
        if i % per_class == 0:
            os.makedirs(d, exist_ok=True)
        os.link(sources[i % len(sources)], os.path.join(d, f"img_{i:07d}{ext}"))


def check_index(workdir: str, n: int) -> dict:
    from tl_fast.dataset import ImageFolderIndex
    from tl_fast.demo import prepare

    demo = prepare(progress=False)
    sources = sorted(str(p) for p in demo.train.rglob("*.jpg"))
    root = os.path.join(workdir, "folder")
    if not os.path.isdir(root):
        _folder(root, n, max(1, n // 1000), sources, ".jpg")
    cache = tempfile.mkdtemp(dir=workdir, prefix="index-cache-")
    t0 = time.perf_counter()
    index = ImageFolderIndex(root, cache_dir=cache, progress=False)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    ImageFolderIndex(root, cache_dir=cache, progress=False)
    warm = time.perf_counter() - t0
    shutil.rmtree(cache)
    return {"images": len(index), "index_s": cold, "index_images_per_s": len(index) / cold, "cached_index_s": warm}


def check_convert(workdir: str, n: int) -> dict:
    from tl_fast.store.commands import convert_pt

    v, i = synthetic_topk_maps(1, num_classes=1000, topk=5, map_size=(18, 18), seed=0)
    src = os.path.join(workdir, "pt")
    if not os.path.isdir(src):
        one = os.path.join(workdir, "one.pt")
        torch.save(torch.stack([torch.from_numpy(v[0]), torch.from_numpy(i[0]).half()]), one)
        _folder(src, n, max(1, n // 1000), [one], ".pt")
    out = {"files": n}
    for name, workers in (("default", None), ("all_cores", os.cpu_count() or 1)):
        dst = os.path.join(workdir, f"convert-{name}.tls")
        kwargs = {} if workers is None else {"workers": workers}
        t0 = time.perf_counter()
        convert_pt(src, dst, num_classes=1000, progress=False, **kwargs)
        out[f"{name}_files_per_s"] = n / (time.perf_counter() - t0)
        os.remove(dst)
    out["cores"] = os.cpu_count()
    return out


def _write_store(path: str, records: int) -> float:
    distinct = 1024
    v, i = synthetic_topk_maps(distinct, num_classes=1000, topk=5, map_size=(18, 18), kind="smooth", seed=0)
    t0 = time.perf_counter()
    with StoreWriter(path, num_classes=1000, topk=5, map_size=(18, 18)) as w:
        for r in range(records):
            w.add(f"c{r // 1282:04d}/img_{r:07d}", v[r % distinct], i[r % distinct])
    return records / (time.perf_counter() - t0)


def _gather(path: str, batches: int, batch: int = 128, seed: int = 0) -> dict:
    store = LabelStore.open(path)
    gen = np.random.default_rng(seed)
    ids = [gen.integers(0, len(store), batch) for _ in range(batches)]
    store.read(ids[0])  # numba compilation
    before = _rss_file_kb()
    t0 = time.perf_counter()
    for b in ids[1:]:
        store.read(b)
    seconds = time.perf_counter() - t0
    grown = _rss_file_kb() - before
    read = batch * (batches - 1)
    mean_record = float(np.mean(store.record_lengths))
    store.close()
    return {"maps_per_s": read / seconds, "rss_file_kb_per_record": grown / read,
            "record_kb": mean_record / 1024, "records": None}


def check_store(workdir: str, records: int, small: int, batches: int) -> dict:
    out = {}
    big = os.path.join(workdir, "big.tls")
    if not os.path.exists(big):
        out["writer_records_per_s"] = _write_store(big, records)
    small_path = os.path.join(workdir, "small.tls")
    if not os.path.exists(small_path):
        _write_store(small_path, small)
    for name, path, n in (("big", big, records), ("small", small_path, small)):
        g = _gather(path, batches)
        g["records"] = n
        out[f"gather_{name}"] = g
    store = LabelStore.open(big)
    t0 = time.perf_counter()
    store.verify()
    out["verify_records_per_s"] = len(store) / (time.perf_counter() - t0)
    out["store_gb"] = os.path.getsize(big) / 1e9
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="which checks: index, convert, store")
    p.add_argument("--workdir", help="where the folders and stores go (kept when given, else removed)")
    p.add_argument("--images", type=int, default=100_000, help="files in the indexed folder")
    p.add_argument("--pt-files", type=int, default=20_000, help="public .pt files to convert")
    p.add_argument("--records", type=int, default=IMAGENET_TRAIN, help="records in the large store")
    p.add_argument("--small-records", type=int, default=32_768, help="records in the cache-sized store")
    p.add_argument("--gather-batches", type=int, default=400, help="random batches of 128 gathered per store")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    if bad := [x for x in parts if x not in PARTS]:
        p.error(f"unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="tl_fast_scale_")
    os.makedirs(workdir, exist_ok=True)
    results = {}
    try:
        if "index" in parts:
            results["index"] = check_index(workdir, args.images)
            r = results["index"]
            print(f"index: {r['images']} images in {r['index_s']:.1f} s ({r['index_images_per_s']:.0f} images/s); "
                  f"again from the cache {r['cached_index_s']:.2f} s")
        if "convert" in parts:
            results["convert"] = check_convert(workdir, args.pt_files)
            r = results["convert"]
            print(f"convert-pt: {r['default_files_per_s']:.0f} files/s by default, {r['all_cores_files_per_s']:.0f} "
                  f"with {r['cores']} workers ({r['files']} files)")
        if "store" in parts:
            results["store"] = r = check_store(workdir, args.records, args.small_records, args.gather_batches)
            if "writer_records_per_s" in r:
                print(f"writer: {r['writer_records_per_s']:.0f} records/s")
            for name in ("big", "small"):
                g = r[f"gather_{name}"]
                print(f"gather, {g['records']} records: {g['maps_per_s']:.0f} maps/s, file-backed memory "
                      f"+{g['rss_file_kb_per_record']:.1f} kB per {g['record_kb']:.1f} kB record read")
            print(f"verify: {r['verify_records_per_s']:.0f} records/s ({r['store_gb']:.2f} GB store)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
