"""ImageNet-scale figures of the host-side tools: indexing, convert-pt, the store's writer, gathers, verify.

Builds in ``--workdir`` (default: a temp dir; about 5 GB at the default sizes):

* an ImageFolder of ``--images`` files (default 100,000) in 1,000 class folders, hard links to the
  demo dataset's JPEGs, indexed by ``ImageFolderIndex`` with an empty index cache;
* ``--pt-files`` public label files (``<class>/<image>.pt``, hard links to one real ``torch.save``
  file), converted by ``convert_pt`` with the default worker count, in one process (``workers=0``,
  the old way) and with one worker per available core;
* a lossless store of ``--records`` records (default 1,281,167, ImageNet-1k's train split; 18x18
  top-5 maps of K=1000, cycling through 1,024 distinct annotator-like maps), written with
  ``StoreWriter``; then random batched gathers (batch 128) from it and from a cache-sized store
  (``--small-records``) with each mapping access of ``LabelStore`` ("normal" is the mapping before
  issue 19), from a warm page cache and from a cold one (the store evicted with
  ``posix_fadvise(DONTNEED)``, which touches no other file), interleaved round by round: maps/s, the
  file-backed memory each gathered record maps in and the bytes it reads from storage
  (``/proc/self/io``); and ``verify()``.

Rows: the gathers (label-store target) and the tools' rates (``benchmarks/results/scale_check.json``).

    python -m benchmarks.scale_check [--parts index,convert,store] [--workdir DIR] [--json out.json]
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

from benchmarks import harness
from benchmarks.synthetic import synthetic_topk_maps
from tl_fast.store import LabelStore, StoreWriter

PARTS = ("index", "convert", "store")
IMAGENET_TRAIN = 1_281_167


def _proc_value(path: str, key: str) -> int:
    """The first number after ``key`` in the ``/proc`` file ``path`` (0 if absent)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _rss_file_kb() -> int:
    """File-backed resident memory of this process (kB), from /proc/self/status."""
    return _proc_value("/proc/self/status", "RssFile:")


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
    for stale in (".tl_fast_index.npz", ".tl_fast_check.npz"):  # a kept --workdir: index from scratch again
        if os.path.exists(os.path.join(root, stale)):
            os.remove(os.path.join(root, stale))
    import tqdm

    bar_at = []  # when the indexer made its progress bar (how long a user sees nothing)
    real_bar = tqdm.tqdm

    def bar(*a, **k):
        bar_at.append(time.perf_counter() - t0)
        return real_bar(*a, **k)

    tqdm.tqdm = bar
    t0 = time.perf_counter()
    try:
        index = ImageFolderIndex(root, cache_dir=cache, progress=False)
    finally:
        tqdm.tqdm = real_bar
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    ImageFolderIndex(root, cache_dir=cache, progress=False)
    warm = time.perf_counter() - t0
    shutil.rmtree(cache)
    return {"images": len(index), "index_s": cold, "index_images_per_s": len(index) / cold, "cached_index_s": warm,
            "bar_after_s": bar_at[0] if bar_at else None}


def check_convert(workdir: str, n: int) -> dict:
    from tl_fast.store.commands import convert_pt

    v, i = synthetic_topk_maps(1, num_classes=1000, topk=5, map_size=(18, 18), seed=0)
    src = os.path.join(workdir, "pt")
    if not os.path.isdir(src):
        one = os.path.join(workdir, "one.pt")
        torch.save(torch.stack([torch.from_numpy(v[0]), torch.from_numpy(i[0]).half()]), one)
        _folder(src, n, max(1, n // 1000), [one], ".pt")
    out = {"files": n}
    cores = len(os.sched_getaffinity(0))
    for name, workers in (("default", None), ("one_process", 0), ("all_cores", cores)):
        dst = os.path.join(workdir, f"convert-{name}.tls")
        kwargs = {} if workers is None else {"workers": workers}
        t0 = time.perf_counter()
        convert_pt(src, dst, num_classes=1000, progress=False, **kwargs)
        out[f"{name}_files_per_s"] = n / (time.perf_counter() - t0)
        os.remove(dst)
    out["cores"] = cores
    return out


def _write_store(path: str, records: int) -> float:
    distinct = 1024
    v, i = synthetic_topk_maps(distinct, num_classes=1000, topk=5, map_size=(18, 18), kind="smooth", seed=0)
    t0 = time.perf_counter()
    with StoreWriter(path, num_classes=1000, topk=5, map_size=(18, 18)) as w:
        for r in range(records):
            w.add(f"c{r // 1282:04d}/img_{r:07d}", v[r % distinct], i[r % distinct])
    return records / (time.perf_counter() - t0)


def _read_bytes() -> int:
    """Bytes this process caused to be read from storage, from /proc/self/io (page-fault reads included)."""
    return _proc_value("/proc/self/io", "read_bytes:")


def _evict(path: str) -> None:
    """Drop ``path``'s unmapped pages from the page cache (only this file; other processes' caches stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cache(path: str) -> None:
    """Read ``path`` through once, so a warm run finds all of it in the page cache (a cold run before
    it left it partly evicted)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _gather(path: str, batches: int, access: str, cold: bool, batch: int = 128, seed: int = 0) -> dict:
    """Random batched gathers from a fresh mapping of ``path`` opened with ``access`` ("normal" is the
    kernel's default mapping), from a warm page cache or (``cold``) after evicting the file: maps/s,
    and per record read the file-backed memory mapped into the process and the bytes read from
    storage. For "populate" the mapping's set-up (it reads the whole store in when cold) is timed
    apart, as ``setup_s``; the gathers after it are what a loader sees for the rest of the run."""
    store = LabelStore.open(path)
    gen = np.random.default_rng(seed)
    ids = [gen.integers(0, len(store), batch) for _ in range(batches + 1)]
    store.read(ids[0])  # numba compilation (cached on disk after the first run)
    if cold:
        _evict(path)
    else:
        _cache(path)
    rss, io = _rss_file_kb(), _read_bytes()
    t0 = time.perf_counter()
    store.advise(access)
    setup = time.perf_counter() - t0
    rss_setup, io_setup = _rss_file_kb(), _read_bytes()
    t0 = time.perf_counter()
    for b in ids[1:]:
        store.read(b)
    seconds = time.perf_counter() - t0
    read = batch * batches
    out = {"access": access, "cold": cold, "maps_per_s": read / seconds, "setup_s": setup,
           "setup_storage_mb": (io_setup - io) / 2**20,
           "rss_file_kb_per_record": (_rss_file_kb() - rss_setup) / read,
           "storage_kb_per_record": (_read_bytes() - io_setup) / 1024 / read,
           "record_kb": float(np.mean(store.record_lengths)) / 1024}
    store.close()
    return out


ACCESSES = ("normal", "random", "populate")


def _gathers(path: str, batches: int, cold_batches: int, rounds: int) -> list[dict]:
    """Warm and cold gathers with every access (the order flips every round); medians over rounds."""
    runs: dict[tuple[bool, str], list[dict]] = {}
    for r in range(rounds):
        for cold in (False, True):
            for access in (ACCESSES if r % 2 == 0 else ACCESSES[::-1]):
                g = _gather(path, cold_batches if cold else batches, access, cold, seed=r)
                runs.setdefault((cold, access), []).append(g)
    out = []
    for (cold, access), gs in sorted(runs.items(), key=lambda kv: (kv[0][0], ACCESSES.index(kv[0][1]))):
        med = {k: float(np.median([g[k] for g in gs])) for k in gs[0] if k not in ("access", "cold")}
        out.append({"access": access, "cold": cold, "rounds": len(gs), **med})
    return out


def check_store(workdir: str, records: int, small: int, batches: int, cold_batches: int, rounds: int) -> dict:
    out = {}
    big = os.path.join(workdir, "big.tls")
    if not os.path.exists(big):
        out["writer_records_per_s"] = _write_store(big, records)
    small_path = os.path.join(workdir, "small.tls")
    if not os.path.exists(small_path):
        _write_store(small_path, small)
    from tl_fast.store.reader import available_memory, resolve_access

    for name, path, n in (("big", big, records), ("small", small_path, small)):
        with LabelStore.open(path) as s:
            auto = resolve_access("auto", int(s.header["index_offset"]))
        out[f"gather_{name}"] = {"records": n, "auto": auto, "runs": _gathers(path, batches, cold_batches, rounds)}
    out["available_memory_gb"] = available_memory() / 1e9
    store = LabelStore.open(big)
    store.read(np.arange(8))  # warm the page cache's view of the header and numba
    t0 = time.perf_counter()
    store.verify()
    out["verify_records_per_s"] = len(store) / (time.perf_counter() - t0)
    out["store_gb"] = os.path.getsize(big) / 1e9
    store.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="which checks: index, convert, store")
    p.add_argument("--workdir", help="where the folders and stores go (kept when given, else removed)")
    p.add_argument("--images", type=int, default=100_000, help="files in the indexed folder")
    p.add_argument("--pt-files", type=int, default=20_000, help="public .pt files to convert")
    p.add_argument("--records", type=int, default=IMAGENET_TRAIN, help="records in the large store")
    p.add_argument("--small-records", type=int, default=32_768, help="records in the cache-sized store")
    p.add_argument("--gather-batches", type=int, default=400, help="random batches of 128 per warm gather run")
    p.add_argument("--cold-batches", type=int, default=25,
                   help="random batches of 128 per cold gather run (the store evicted from the page cache first)")
    p.add_argument("--gather-rounds", type=int, default=3, help="interleaved rounds of every gather variant")
    p.add_argument("--json", help="also write the figures to this JSON file")
    harness.add_record_arguments(p)
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
            print(f"index: {r['images']} images in {r['index_s']:.1f} s ({r['index_images_per_s']:.0f} images/s), "
                  f"progress bar made after {r['bar_after_s']:.1f} s; again from the cache {r['cached_index_s']:.2f} s")
        if "convert" in parts:
            results["convert"] = check_convert(workdir, args.pt_files)
            r = results["convert"]
            print(f"convert-pt: {r['default_files_per_s']:.0f} files/s by default, {r['one_process_files_per_s']:.0f} "
                  f"in one process (--workers 0), {r['all_cores_files_per_s']:.0f} with {r['cores']} workers "
                  f"({r['files']} files)")
        if "store" in parts:
            results["store"] = r = check_store(workdir, args.records, args.small_records, args.gather_batches,
                                               args.cold_batches, args.gather_rounds)
            if "writer_records_per_s" in r:
                print(f"writer: {r['writer_records_per_s']:.0f} records/s")
            for name in ("big", "small"):
                gr = r[f"gather_{name}"]
                print(f"gather, {gr['records']} records (access='auto' picks {gr['auto']!r} with "
                      f"{r['available_memory_gb']:.1f} GB available):")
                for g in gr["runs"]:
                    setup = (f", set-up {g['setup_s']:.2f} s reading {g['setup_storage_mb']:.0f} MB"
                             if g["access"] == "populate" else "")
                    print(f"  {'cold' if g['cold'] else 'warm'} {g['access']:<8}: {g['maps_per_s']:8.0f} maps/s; per "
                          f"{g['record_kb']:.1f} kB record: file-backed memory +{g['rss_file_kb_per_record']:.1f} kB, "
                          f"read from storage {g['storage_kb_per_record']:.1f} kB{setup}")
            print(f"verify: {r['verify_records_per_s']:.0f} records/s ({r['store_gb']:.2f} GB store)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    harness.record("scale_check", rows(results), args, argv)


def rows(results: dict) -> list[dict]:
    """The gathers per store, cache state and mapping; the tools' rates."""
    out = []
    if "index" in results:
        r = results["index"]
        out.append(harness.row("index an image folder, cold (quick check of every image)", f"{r['images']} images",
                               r["index_images_per_s"], "images/s", target="imagenet-scale",
                               seconds=r["index_s"], cached_index_s=r["cached_index_s"],
                               progress_bar_after_s=r["bar_after_s"]))
    if "convert" in results:
        r = results["convert"]
        out.append(harness.row("convert-pt, default workers", f"{r['files']} public .pt files, {r['cores']} cores",
                               r["default_files_per_s"], "files/s", target="imagenet-scale",
                               baseline="in one process (--workers 0)", baseline_value=r["one_process_files_per_s"],
                               ratio=r["default_files_per_s"] / r["one_process_files_per_s"],
                               ratio_of="value / baseline"))
    if "store" in results:
        r = results["store"]
        if "writer_records_per_s" in r:
            out.append(harness.row("StoreWriter, one thread", f"{r['gather_big']['records']} records, 18x18 top-5 "
                                   "K=1000", r["writer_records_per_s"], "records/s", target="imagenet-scale"))
        out.append(harness.row("LabelStore.verify(), one thread", f"{r['store_gb']:.2f} GB store",
                               r["verify_records_per_s"], "records/s", target="imagenet-scale"))
        for name in ("big", "small"):
            g = r[f"gather_{name}"]
            for run in g["runs"]:
                chosen = run["access"] == g["auto"] and not run["cold"]
                config = (f"{g['records']:,} records, {'cold' if run['cold'] else 'warm'} page cache, "
                          f"{run['rounds']} rounds; access='auto' picks {g['auto']!r}")
                out.append(harness.row(
                    f"batched gather (128), mapping {run['access']!r}", config, run["maps_per_s"], "maps/s",
                    target="label-store", goal=">= 200,000 maps/s" if chosen else None,
                    meets=run["maps_per_s"] >= 200_000, mapped_kb_per_record=run["rss_file_kb_per_record"],
                    storage_kb_per_record=run["storage_kb_per_record"], setup_s=run["setup_s"]))
    return out


if __name__ == "__main__":
    main()
