"""``tl-fast fingerprint STORE IMAGES``: record in a store the content fingerprint of every image.

Stores written before format version 2, by ``convert-pt`` (the public ``.pt`` layout knows nothing
of the images) or by any writer that passed no fingerprints bind records to images by path only.
This command copies such a store's records byte for byte (each verified on the way) into a new
store that also records, per record, the fingerprint of the image with its key under IMAGES; the
loaders then refuse images that differ from those (:func:`tl_fast.dataset.join_labels`).

Fingerprints added this way vouch for the keys only: records that were already shifted against
their keys before this command ran are not detected (annotate records each image's fingerprint with
the map made from it). A store whose records moved against their fingerprints is refused.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .codec import StoreError
from .reader import LabelStore
from .writer import StoreWriter


def fingerprint_store(src: str | os.PathLike, images: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                      progress: bool = True, batch_size: int = 4096) -> dict:
    """Write ``dst`` (default: replace ``src``, atomically) = ``src`` plus the fingerprints of the
    images under ``images``. Returns counts: records, fingerprinted, without an image. A store whose
    records mostly have no image under ``images`` is an error (wrong folder)."""
    from tqdm.auto import tqdm

    from ..dataset import MIN_MATCH_FRACTION, ImageFolderIndex

    store = LabelStore.open(src)
    store.check_seals()  # fingerprints by key would hide records that moved against their fingerprints
    index = ImageFolderIndex(images, allow_empty_classes=True, progress=progress)
    found = {k: (int(s), int(h)) for k, s, h in zip(index.keys, index.byte_sizes, index.fingerprints)}
    n = len(store)
    matched = sum(k in found for k in store.keys)
    if matched < MIN_MATCH_FRACTION * n:
        example = next((k for k in store.keys if k not in found), "")
        raise ValueError(f"only {matched} of {n} records of {store.path} have an image under {images} (no image for "
                         f"{example!r}): wrong image folder?")
    meta = {**store.metadata, "fingerprints_from": os.path.abspath(images)}
    meta.pop("lossy", None)
    checksums = store._checksums
    with StoreWriter(dst if dst is not None else src, num_classes=store.num_classes, topk=store.topk,
                     map_size=store.map_size, lossy=store.lossy, metadata=meta) as writer:
        bar = tqdm(total=n, unit="rec", desc="fingerprint", disable=not progress)
        with bar:
            for start in range(0, n, batch_size):
                ids = np.arange(start, min(n, start + batch_size))
                store.read(ids)  # verifies every record's checksum and bounds before it is copied
                for i in ids:
                    key = store.keys[i]
                    writer.add_encoded(key, store.record_bytes(int(i)), int(checksums[i]), fingerprint=found.get(key))
                bar.update(len(ids))
    store.close()
    return {"records": n, "fingerprinted": matched, "without_image": n - matched}


def _cmd(args: argparse.Namespace) -> int:
    try:
        res = fingerprint_store(args.store, args.images, args.out, progress=not args.quiet)
    except (StoreError, OSError, ValueError) as err:
        print(f"tl-fast fingerprint: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out or args.store}: {res['fingerprinted']} of {res['records']} records fingerprinted"
          + (f", {res['without_image']} without an image under {args.images}" if res["without_image"] else ""))
    return 0


def register(subparsers) -> None:
    """Add ``tl-fast fingerprint``."""
    p = subparsers.add_parser(
        "fingerprint", help="record in a label store the content fingerprint of every image",
        description="Copy STORE's records (verified) into a store that also records, per record, the content "
        "fingerprint (size and a hash of the first and last 2 KB) of the image with its key under IMAGES, so that "
        "loaders refuse images other than those (e.g. a train store against val images with the same names). "
        "For stores from convert-pt or older versions; tl-fast annotate records fingerprints itself.")
    p.add_argument("store", metavar="STORE", help="label store file")
    p.add_argument("images", metavar="IMAGES", help="the image folder the store was made for")
    p.add_argument("--out", default=None, help="write here instead of replacing STORE (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)
