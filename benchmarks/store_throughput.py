"""Label-store benchmark: batched gather rate and bytes per record against one ``.pt`` file per sample.

Builds, in a temporary folder, N realistic 18x18 top-5 K=1000 maps (``tl_fast.store.synthetic``,
kind "smooth"), writes them as a lossless store, a lossy store and the public layout (one
``torch.save`` of a ``[2, 5, 18, 18]`` float16 tensor per image), then measures in the same run:

* gather: ``LabelStore.read(ids)`` at batch 128 over a random permutation, one thread;
* decode_records: the same from a padded 2-D array of raw records (what FFCV/DALI loaders hand over);
* public: ``torch.load(weights_only=True)`` of one file per sample, stacked into a batch;
* bytes per record (lossless, lossy) against the public file size, on "smooth", "field" and "random"
  maps.

Medians over repeats (20th/80th percentiles in the returned dict). Run:
``python benchmarks/store_throughput.py [--n 4096] [--repeats 7]``.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numba
import numpy as np
import torch

from tl_fast.store import LabelStore, StoreWriter, decode_records, encode_record
from tl_fast.store.synthetic import synthetic_topk_maps


def _time_interleaved(fns: dict, repeats: int) -> dict[str, np.ndarray]:
    """Seconds per call of each function; the functions take turns in every repeat so that load
    from other processes affects all of them alike."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {name: np.asarray(v) for name, v in out.items()}


def _rate(items: int, seconds: np.ndarray) -> dict:
    rates = items / seconds
    return {"median": float(np.median(rates)), "p20": float(np.percentile(rates, 20)),
            "p80": float(np.percentile(rates, 80)), "best": float(rates.max())}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="maps in the store (default 4096)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--map-size", type=int, nargs=2, default=(18, 18))
    p.add_argument("--public-n", type=int, default=1024, help="samples per repeat for the torch.load baseline")
    p.add_argument("--size-n", type=int, default=256, help="maps per kind for the bytes/record table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)

    numba.set_num_threads(1)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n, bsz, k, hw, nc = args.n, args.batch, args.topk, tuple(args.map_size), args.num_classes
    rng = np.random.default_rng(args.seed)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    results: dict = {"machine": f"{_cpu_name()} ({os.cpu_count()} cpus)", "load_avg": load, "n": n, "batch": bsz,
                     "num_classes": nc, "topk": k, "map_size": hw, "threads": 1}
    try:
        values, indices = synthetic_topk_maps(n, num_classes=nc, topk=k, map_size=hw, kind="smooth", seed=args.seed)
        with tempfile.TemporaryDirectory(prefix="tl_fast_store_bench_") as tmp:
            paths = {}
            for mode in ("lossless", "lossy"):
                paths[mode] = os.path.join(tmp, f"{mode}.tls")
                with StoreWriter(paths[mode], num_classes=nc, topk=k, map_size=hw, lossy=mode == "lossy") as w:
                    for i in range(n):
                        w.add(f"c{i % 10}/img{i:06d}", values[i], indices[i])
            pub = os.path.join(tmp, "pub")
            files = []
            for i in range(min(n, args.public_n)):
                d = os.path.join(pub, f"c{i % 10}")
                os.makedirs(d, exist_ok=True)
                f = os.path.join(d, f"img{i:06d}.pt")
                torch.save(torch.stack([torch.from_numpy(values[i]), torch.from_numpy(indices[i]).half()]), f)
                files.append(f)
            pt_bytes = float(np.mean([os.path.getsize(f) for f in files]))

            store = LabelStore.open(paths["lossless"])
            lossy = LabelStore.open(paths["lossy"])
            perm = rng.permutation(n)
            batches = [perm[s:s + bsz] for s in range(0, n - bsz + 1, bsz)]
            gathered = len(batches) * bsz

            def gather(s=store):
                for b in batches:
                    s.read(b)

            padded, lens = store.raw_records(np.arange(n))

            def raw_decode():
                for b in batches:
                    decode_records(padded[b], nc, k, hw, lengths=lens[b])

            pub_batches = [rng.permutation(len(files))[s:s + bsz] for s in range(0, len(files) - bsz + 1, bsz)]

            def public():
                for b in pub_batches:
                    ts = [torch.load(files[j], map_location="cpu", weights_only=True) for j in b]
                    t = torch.stack(ts)
                    t[:, 0].contiguous(), t[:, 1].long()

            for fn in (gather, raw_decode, public, lambda: gather(lossy)):  # warm-up: compile, page cache
                fn()
            secs = _time_interleaved({"gather": gather, "lossy": lambda: gather(lossy), "raw": raw_decode,
                                      "public": public}, args.repeats)
            results["gather_maps_s"] = _rate(gathered, secs["gather"])
            results["gather_lossy_maps_s"] = _rate(gathered, secs["lossy"])
            results["decode_records_maps_s"] = _rate(gathered, secs["raw"])
            results["public_maps_s"] = _rate(len(pub_batches) * bsz, secs["public"])
            check = store.read(perm[:8])
            assert np.array_equal(check.values.numpy().view(np.uint16), values[perm[:8]].view(np.uint16))
            results["public_pt_bytes"] = pt_bytes
            results["bytes"] = {"smooth": {"lossless": float(store.record_lengths.mean()),
                                           "lossless_file": store.nbytes / n,
                                           "lossy": float(lossy.record_lengths.mean()),
                                           "lossy_file": lossy.nbytes / n}}
            store.close()
            lossy.close()
        for kind in ("field", "random"):
            v, i = synthetic_topk_maps(args.size_n, num_classes=nc, topk=k, map_size=hw, kind=kind, seed=args.seed + 1)
            results["bytes"][kind] = {
                "lossless": float(np.mean([encode_record(v[j], i[j])[0].nbytes for j in range(len(v))])),
                "lossy": float(np.mean([encode_record(v[j], i[j], lossy=True)[0].nbytes for j in range(len(v))]))}
    finally:
        torch.set_num_threads(torch_threads)

    if not args.quiet:
        print(format_table(results))
    return results


def format_table(r: dict) -> str:
    """Markdown table of the figures returned by :func:`main`."""
    pub = r["public_maps_s"]["median"]
    pt = r["public_pt_bytes"]
    lines = [f"Label store, {r['map_size'][0]}x{r['map_size'][1]} top-{r['topk']} K={r['num_classes']} maps, "
             f"N={r['n']}, batch {r['batch']}, 1 thread, {r['machine']}, load average {r['load_avg']:.1f} "
             "at start", "",
             "| read path | maps/s (median) | p20-p80 | best | vs public (medians) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, key in (("public: torch.load one .pt per sample", "public_maps_s"),
                      ("LabelStore.read (lossless)", "gather_maps_s"),
                      ("LabelStore.read (lossy)", "gather_lossy_maps_s"),
                      ("decode_records (padded raw records)", "decode_records_maps_s")):
        x = r[key]
        lines.append(f"| {name} | {x['median']:,.0f} | {x['p20']:,.0f}-{x['p80']:,.0f} | {x['best']:,.0f} | "
                     f"{x['median'] / pub:.1f}x |")
    lines += ["", "| maps | public .pt B | lossless B/record | ratio | lossy B/record | ratio |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind, b in r["bytes"].items():
        lines.append(f"| {kind} | {pt:,.0f} | {b['lossless']:,.0f} | {b['lossless'] / pt:.1%} | "
                     f"{b['lossy']:,.0f} | {b['lossy'] / pt:.1%} |")
    s = r["bytes"]["smooth"]
    lines.append(f"\n(smooth, whole file incl. index and manifest: lossless {s['lossless_file']:,.0f} B/record, "
                 f"lossy {s['lossy_file']:,.0f} B/record)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
