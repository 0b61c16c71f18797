"""``tl-fast convert-pt`` and ``tl-fast inspect``: label-store commands.

``convert-pt SRC DST`` converts a public per-image layout into one store: ``SRC/<class>/<stem>.pt``,
each one ``[2, k, H, W]`` tensor (scores, then class ids stored as floats; H, W the map's rows and
columns), ``<stem>`` the image's file name cut at its first ``.``. Two published layouts (see
:data:`LAYOUTS`) differ in the tensors' dtype. ``inspect STORE`` prints the header and statistics,
``--verify`` checks every record.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .codec import StoreError
from .reader import LabelStore
from .writer import StoreWriter


# The published per-image layouts, read from their public code. Both name a file
# <class>/<image name up to its first '.'>.pt and hold [2, k, rows, cols] (scores, then class ids).
LAYOUTS: dict[str, torch.dtype] = {
    # zihangJiang/TokenLabeling generate_label.py: top-k logits of each position, saved .half()
    # (class ids as float16: exact up to 2048).
    "tokenlabeling": torch.float16,
    # naver-ai/relabel_imagenet: [2, 5, 15, 15] maps; its loader scatters the scores as loaded into a
    # float32 map, which scatter_ accepts only from float32 (class ids exact up to 2^24).
    "relabel": torch.float32,
}


def detect_layout(dtype: torch.dtype, path) -> str:
    """The layout whose files hold ``dtype`` tensors; StoreError naming ``path`` when none does."""
    for name, want in LAYOUTS.items():
        if dtype == want:
            return name
    known = ", ".join(f"{n} ({str(d).replace('torch.', '')})" for n, d in LAYOUTS.items())
    raise StoreError(f"{path}: a {str(dtype).replace('torch.', '')} tensor matches no known layout ({known}); "
                     "pass --layout to read it as one of them")


def public_pt_bytes(topk: int, map_size: tuple[int, int]) -> int:
    """Size of one public label file (``torch.save`` of a ``[2, k, H, W]`` float16 tensor)."""
    buf = io.BytesIO()
    torch.save(torch.zeros(2, topk, *map_size, dtype=torch.float16), buf)
    return buf.tell()


def _load_public(path: Path, shape: tuple[int, int, int] | None,
                 dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray, torch.dtype]:
    """Values, class ids (int64) and the stored dtype of one public ``.pt`` file; StoreError naming it
    if bad or (with ``dtype``) stored in another dtype than the layout's."""
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise StoreError(f"{path}: cannot load label file ({type(err).__name__}: {err})") from err
    if not isinstance(t, torch.Tensor):
        raise StoreError(f"{path}: expected a [2, k, H, W] tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[0] != 2:
        raise StoreError(f"{path}: expected a [2, k, H, W] tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape[1:]) != shape:
        first = ", ".join(map(str, shape))
        raise StoreError(f"{path}: shape {tuple(t.shape)} differs from the first file's [2, {first}]")
    if not t.is_floating_point():
        raise StoreError(f"{path}: expected a floating tensor (scores and ids as floats), got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        layout = next((n for n, d in LAYOUTS.items() if d == dtype), str(dtype))
        raise StoreError(f"{path}: a {str(t.dtype).replace('torch.', '')} tensor, but the {layout} layout stores "
                         f"{str(dtype).replace('torch.', '')} (the first file's); the folder mixes layouts, or pass "
                         "--layout to choose the other one")
    values = t[0].numpy()
    ids_f = t[1].to(torch.float64).numpy()
    if not np.all(np.isfinite(ids_f)) or np.any(ids_f != np.round(ids_f)) or np.any(ids_f < 0):
        bad = ids_f[~(np.isfinite(ids_f) & (ids_f == np.round(ids_f)) & (ids_f >= 0))][0]
        raise StoreError(f"{path}: class ids must be non-negative integers, found {bad}")
    return values, ids_f.astype(np.int64), t.dtype


def _load_job(job: tuple[str, tuple[int, int, int], torch.dtype]) -> tuple[np.ndarray, np.ndarray, torch.dtype]:
    return _load_public(Path(job[0]), job[1], job[2])


# Below this many files convert-pt's default loads them in process: a pool's start-up costs more.
POOL_MIN_FILES = 512


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and ``taskset`` narrow;
    ``os.cpu_count()`` where the platform has no affinity call)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def default_workers(num_files: int) -> int:
    """convert-pt's default loader processes for ``num_files`` files: one per available core, or 0
    (load in process) with a single core or fewer than :data:`POOL_MIN_FILES` files."""
    cores = available_cores()
    return cores if cores > 1 and num_files >= POOL_MIN_FILES else 0


def convert_pt(src: str | os.PathLike, dst: str | os.PathLike, *, num_classes: int | None = None,
               lossy: bool = False, progress: bool = True, workers: int | None = None,
               layout: str = "auto") -> LabelStore:
    """Convert ``src/<class>/<stem>.pt`` files into the store ``dst``; returns the opened store.

    ``layout`` is ``"tokenlabeling"`` (float16 files), ``"relabel"`` (float32) or ``"auto"`` (from the
    first file's dtype); every file must match it. Scores are stored as float16 (a float32 score keeps
    11 significant bits). Keys are the files' paths relative to ``src`` without ``.pt``: the image
    name cut at its first ``.``, which the loader's join accepts beside its own key rule. Without
    ``num_classes`` it is inferred as the largest class id seen + 1. ``workers > 0`` loads the files
    in that many processes (records are still written in sorted order), 0 in this process; the
    default (None) is one process per available core, or this process for a few files or one core,
    where starting processes costs more than it saves (:func:`default_workers`)."""
    from tqdm.auto import tqdm

    root = Path(src)
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0: load in this process), got {workers}")
    if not root.is_dir():
        raise StoreError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*.pt") if p.is_file())
    if not files:
        raise StoreError(f"{root}: no .pt label files found (expected SRC/<class>/<image>.pt)")
    if layout != "auto" and layout not in LAYOUTS:
        raise StoreError(f"layout must be 'auto' or one of {sorted(LAYOUTS)}; got {layout!r}")
    first = _load_public(files[0], None, LAYOUTS.get(layout))
    shape = first[0].shape
    layout = detect_layout(first[2], files[0]) if layout == "auto" else layout
    dtype = LAYOUTS[layout]
    if workers is None:
        workers = default_workers(len(files))
    source_bytes = sum(p.stat().st_size for p in files)
    meta = {"source": "convert-pt", "src": str(root), "source_bytes": source_bytes, "source_files": len(files),
            "layout": layout}
    pool = None
    if workers > 0 and len(files) > 1:
        import multiprocessing

        pool = multiprocessing.get_context().Pool(workers)
        jobs = [(str(p), shape, dtype) for p in files[1:]]
        loaded = itertools.chain([first], pool.imap(_load_job, jobs, chunksize=64))
    else:
        loaded = (first if i == 0 else _load_public(p, shape, dtype) for i, p in enumerate(files))
    try:
        with StoreWriter(dst, num_classes=num_classes, topk=shape[0], map_size=shape[1:], lossy=lossy,
                         metadata=meta) as writer:
            bar = tqdm(total=len(files), unit="file", desc="convert-pt", disable=not progress)
            with bar:
                for path, (values, ids, _) in zip(files, loaded):
                    key = path.relative_to(root).with_suffix("").as_posix()
                    try:
                        writer.add(key, values, ids)
                    except StoreError as err:
                        raise StoreError(f"{path}: {err}") from None
                    bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return LabelStore.open(dst)


def verify_against_images(store: LabelStore, images: str | os.PathLike, out=None) -> dict[str, Any]:
    """Check ``store`` against the image folder ``images``: every usable image has a record, every
    record an image, and every recorded content fingerprint is the image's. Prints what differs;
    returns the counts and ``ok``."""
    from ..classes import ClassMismatch
    from ..dataset import ImageFolderIndex, check_store_classes, fingerprint_mismatches

    out = out or sys.stdout
    index = ImageFolderIndex(images, allow_empty_classes=True, progress=out is sys.stdout)
    position = {k: i for i, k in enumerate(store.keys)}
    record = np.array([position.get(k, -1) for k in index.keys], dtype=np.int64)
    no_record = [index.paths[i] for i in np.flatnonzero(record < 0)]
    no_image = sorted(set(store.keys) - set(index.keys))
    mismatched = fingerprint_mismatches(index, store, record)
    with_fp = int(store.has_fingerprint()[record[record >= 0]].sum()) if (record >= 0).any() else 0
    res = {"images": len(index), "skipped_images": len(index.skipped), "no_record": len(no_record),
           "no_image": len(no_image), "mismatched": len(mismatched), "fingerprinted": with_fp,
           "class_count_differs": store.num_classes != index.num_classes}
    try:  # the class list the store records (annotate writes it), compared by name
        check_store_classes(store, index.classes, str(images))
        classes_differ = ""
    except ClassMismatch as err:
        classes_differ = str(err)
    res["classes_differ"] = bool(classes_differ)
    res["ok"] = not (no_record or no_image or mismatched or res["class_count_differs"] or classes_differ)

    def show(what: str, items: list[str]) -> None:
        if items:
            print(f"            {len(items)} {what}: " + "; ".join(items[:5]) + (" ..." if len(items) > 5 else ""),
                  file=out)

    print(f"images      {len(index)} usable under {images} ({len(index.skipped)} skipped), "
          f"{len(index) - len(no_record)} with a record, {with_fp} of them fingerprinted", file=out)
    if res["class_count_differs"]:
        print(f"            the store has K={store.num_classes} but {images} has {index.num_classes} class folders",
              file=out)
    elif classes_differ:
        print(f"            {classes_differ}", file=out)
    show("image(s) without a record", no_record)
    show("record(s) without an image", no_image)
    show("image(s) differing from the one the store was made for", mismatched)
    if store.fingerprints is None:
        print("            the store records no image fingerprints (older format or writer): only paths compared",
              file=out)
    elif store.seals is None:
        print("            the store's fingerprints are not sealed to its records (format version 2): records "
              "reordered against their keys are not seen; tl-fast fingerprint STORE IMAGES rewrites it sealed", file=out)
    print(f"verify      {'store matches the images' if res['ok'] else 'store does NOT match the images'}", file=out)
    return res


def inspect_store(path: str | os.PathLike, *, verify: bool = False, sample: int = 4096,
                  out=None, images: str | os.PathLike | None = None) -> dict[str, Any]:
    """Print the header and statistics of a store; returns them as a dict. ``images``: also check the
    store against that image folder (:func:`verify_against_images`, under ``stats["images"]``)."""
    out = out or sys.stdout
    if sample < 1:
        raise ValueError(f"sample must be >= 1 record, got {sample}")
    if images is not None and not os.path.isdir(images):
        raise ValueError(f"image folder {images} does not exist or is not a directory")
    store = LabelStore.open(path)
    n = len(store)
    k, (h, w) = store.topk, store.map_size
    lengths = store.record_lengths
    pt = public_pt_bytes(k, (h, w))
    stats: dict[str, Any] = {
        "path": store.path, "version": store.header["version"], "records": n, "num_classes": store.num_classes,
        "topk": k, "map_size": (h, w), "lossy": store.lossy, "file_bytes": store.nbytes,
        "record_bytes_mean": float(lengths.mean()) if n else 0.0,
        "record_bytes_max": int(lengths.max()) if n else 0,
        "file_bytes_per_record": store.nbytes / n if n else 0.0, "public_pt_bytes": pt,
    }
    print(f"store       {store.path}", file=out)
    print(f"format      version {stats['version']}, {'lossy' if store.lossy else 'lossless'}", file=out)
    print(f"records     {n}", file=out)
    print(f"maps        top-{k} of K={store.num_classes}, {h}x{w}, class ids as "
          f"{'int16' if store.num_classes <= 32767 else 'int32'}", file=out)
    if store.metadata:
        print(f"metadata    {store.metadata}", file=out)
    print(f"size        {store.nbytes:,} bytes; {stats['file_bytes_per_record']:.0f} B/record in file, "
          f"records mean {stats['record_bytes_mean']:.0f} B (max {stats['record_bytes_max']}); "
          f"~{stats['file_bytes_per_record'] / pt:.1%} of a public .pt file (~{pt} B)" if n else
          f"size        {store.nbytes:,} bytes", file=out)
    if n:
        ids = np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(np.int64)) if not verify \
            else np.arange(n)
        if verify:
            store.verify(progress=True)
            if images is None:  # with images, the comparison below lists the moved records by image
                store.check_seals()
            print(f"verify      all {n} records OK (checksums and bounds"
                  f"{', fingerprint seals' if store.seals is not None and images is None else ''})", file=out)
        maps = store.read(ids[: min(len(ids), sample)])
        v = maps.values.float()
        top1_cls = maps.indices[:, 0].reshape(-1).long()
        hist = torch.bincount(maps.indices.reshape(-1).long(), minlength=store.num_classes)
        top1_hist = torch.bincount(top1_cls, minlength=store.num_classes)
        common = torch.argsort(top1_hist, descending=True)[:5].tolist()
        stats.update(
            sampled=int(v.shape[0]), value_min=float(v.min()), value_max=float(v.max()),
            top1_mean=float(v[:, 0].mean()), classes_seen=int((hist > 0).sum()),
            common_top1=[(c, int(top1_hist[c])) for c in common if top1_hist[c] > 0],
        )
        print(f"values      over {stats['sampled']} records: min {stats['value_min']:.4g}, max "
              f"{stats['value_max']:.4g}, mean top-1 {stats['top1_mean']:.4g}", file=out)
        print(f"classes     {stats['classes_seen']} of {store.num_classes} appear; most frequent top-1: "
              + ", ".join(f"{c} ({cnt})" for c, cnt in stats["common_top1"]), file=out)
    if images is not None:
        stats["images"] = verify_against_images(store, images, out)
    store.close()
    return stats


def _run(func, name: str, *args, **kwargs) -> int:
    try:
        result = func(*args, **kwargs)
    except (StoreError, OSError, ValueError) as err:
        print(f"tl-fast {name}: error: {err}", file=sys.stderr)
        return 1
    return 1 if isinstance(result, dict) and not result.get("images", {"ok": True})["ok"] else 0


def _convert_cmd(args: argparse.Namespace) -> int:
    def go():
        store = convert_pt(args.src, args.dst, num_classes=args.num_classes, lossy=args.lossy,
                           progress=not args.quiet, workers=args.workers, layout=args.layout)
        n = len(store)
        src = store.metadata.get("source_bytes", 0)
        print(f"wrote {args.dst} from the {store.metadata['layout']} layout: {n} records, K={store.num_classes}, "
              f"top-{store.topk}, "
              f"{store.map_size[0]}x{store.map_size[1]}, {store.nbytes / max(n, 1):.0f} B/record, "
              f"{store.nbytes / max(src, 1):.1%} of the {src:,} bytes of .pt files")
        if store.num_classes > 2049 and store.metadata["layout"] == "tokenlabeling":
            print("note: the tokenlabeling layout stores class ids as float16, which is exact only up to 2048; larger "
                  "ids in these files may already have been rounded when they were written", file=sys.stderr)
        if args.num_classes is None:
            print(f"note: num_classes inferred as {store.num_classes} (largest id + 1); pass --num-classes "
                  "to set it explicitly")
        store.close()

    return _run(go, "convert-pt")


def _inspect_cmd(args: argparse.Namespace) -> int:
    store, images = args.store, args.verify if isinstance(args.verify, str) else None
    if store is None and images is not None:  # `inspect --verify STORE`: the flag took the store
        store, images = images, None
    if store is None:
        args.parser.error("missing STORE: tl-fast inspect STORE [--verify [IMAGES]]")
    return _run(inspect_store, "inspect", store, verify=bool(args.verify), sample=args.sample, images=images)


def register(subparsers) -> None:
    """Add ``convert-pt`` and ``inspect`` to the ``tl-fast`` command."""
    p = subparsers.add_parser(
        "convert-pt", help="convert public per-image .pt label maps into a label store",
        description="Convert SRC/<class>/<stem>.pt files (each one [2, k, H, W] tensor: scores, then class ids "
        "as floats) into one label store DST. Two published layouts: TokenLabeling's (float16 files, from its "
        "generate_label.py) and ReLabel's (naver-ai/relabel_imagenet, float32 [2, 5, 15, 15]); both name a file "
        "by its image's name cut at the first '.'. Keys are the relative paths without .pt. Files are loaded "
        "with torch.load(weights_only=True).")
    p.add_argument("src", help="root folder of the public label files")
    p.add_argument("dst", help="output store file (written atomically)")
    p.add_argument("--num-classes", type=int, default=None, help="K (default: largest class id + 1)")
    p.add_argument("--lossy", action="store_true", help="quantize scores to 8-bit codes (see tl_fast.store.format)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes loading .pt files (default: one per available core; 0: in process)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto",
                   help="the files' layout: tokenlabeling (float16) or relabel (float32); default auto: from the "
                   "first file's dtype (every file must match)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_convert_cmd)

    q = subparsers.add_parser("inspect", help="print a label store's header and statistics",
                              description="Print a label store's header, sizes, value statistics and a class "
                              "histogram summary; --verify checks every record's checksum; --verify IMAGES also "
                              "checks the store against that image folder (every image has a record, every record "
                              "an image, recorded content fingerprints match) and exits 1 if they differ.")
    q.add_argument("store", nargs="?", help="label store file")
    q.add_argument("--verify", nargs="?", const=True, default=False, metavar="IMAGES",
                   help="decode and check every record; with IMAGES, also check the store against that folder")
    q.add_argument("--sample", type=int, default=4096, help="records sampled for the statistics (default 4096)")
    q.set_defaults(func=_inspect_cmd, parser=q)
