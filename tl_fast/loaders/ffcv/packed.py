"""The packed-file description: what ``tl-fast pack-ffcv`` writes beside a ``.beton`` and how to read it.

A ``.beton`` holds images + class ids + sample ids + label records (or no records with
``--no-labels``); its sidecar JSON (``OUT.beton.json``) the classes, the label geometry, the samples
left out, the source paths and the image fingerprints. :func:`read_packed` reads both on the host
into a :class:`PackedInfo`; :func:`packed_image_spans` finds every image's bytes in the file.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

import numpy as np

from .field import PlanRGBImageField

META_SUFFIX = ".json"
FORMAT = "tl_fast-ffcv"
FORMAT_VERSION = 4
# Version 3 files (image hashes of the first and last 2 KB) still load with the window check,
# version 2 files (no image hashes, no paths) without any byte check.
READABLE_FORMAT_VERSIONS = (2, 3, 4)
# Field order in the file (the combined metadata names them f0, f1, ... in this order); a file packed
# without labels has the first three only.
FIELDS = ("image", "label", "index", "record")


@dataclass
class PackedInfo:
    """A packed file's description and per-sample metadata, as :func:`read_packed` found them."""

    path: str
    classes: list[str]
    num_classes: int
    topk: int | None  # None (and map_size None) when packed without labels
    map_size: tuple[int, int] | None
    has_records: bool
    sizes: np.ndarray  # [N, 2] original (height, width)
    stored_sizes: np.ndarray  # [N, 2] as stored
    targets: np.ndarray  # [N] int64
    valid_ids: np.ndarray  # samples that decoded at pack time
    record_lengths: np.ndarray | None  # [N]; None without records
    num_invalid: int
    num_one_hot: int
    skipped: list  # [(relative path, reason)]: left out at indexing or pack time
    paths: list[str] | None  # relative source path of every sample (None: an older file)
    image_hashes: np.ndarray | None  # uint64 [N] version 3: hashes of the first and last 2 KB of each image
    content_hashes: np.ndarray | None  # uint64 [N] version 4: packed_hash.content_hash of each image's bytes
    image_spans: tuple[np.ndarray, np.ndarray]  # (offset, size) of every sample's image bytes in the file


def read_packed(path: str | os.PathLike) -> PackedInfo:
    """Read a packed file's description (sidecar JSON) and per-sample metadata (host side)."""
    from ffcv.reader import Reader

    path = str(path)
    if os.path.isdir(path) or not os.path.isfile(path):
        raise ValueError(f"backend='ffcv' reads a .beton written by `tl-fast pack-ffcv IMAGES STORE OUT.beton` "
                         f"(or `IMAGES OUT.beton --no-labels`); {path} is not such a file")
    meta_path = path + META_SUFFIX
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} has no {os.path.basename(meta_path)} beside it: was it written by tl-fast "
                         "pack-ffcv? (repack it)") from None
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_FORMAT_VERSIONS:
        raise ValueError(f"{meta_path}: not a {FORMAT} description of version "
                         f"{' or '.join(map(str, READABLE_FORMAT_VERSIONS))} (repack it with this tl_fast)")
    reader = Reader(path, custom_handlers={"image": PlanRGBImageField})
    md = reader.metadata
    if len(md) != meta["num_samples"]:
        raise ValueError(f"{path} holds {len(md)} samples but {meta_path} says {meta['num_samples']}: files mismatch")
    has_records = bool(meta["has_records"])
    n_fields = len(FIELDS) if has_records else len(FIELDS) - 1
    if len(md.dtype.names) != n_fields:
        raise ValueError(f"{path} has {len(md.dtype.names)} fields but {meta_path} describes {n_fields}: "
                         "files mismatch")
    img, label = md[f"f{FIELDS.index('image')}"], md[f"f{FIELDS.index('label')}"]
    record_lengths = np.asarray(md[f"f{FIELDS.index('record')}"]["size"], dtype=np.int64) if has_records else None
    sizes = np.stack([img["orig_height"], img["orig_width"]], 1).astype(np.int64)
    valid = np.asarray(meta.get("invalid", []), dtype=np.int64)
    valid_mask = np.ones(len(md), bool)
    valid_mask[valid] = False
    return PackedInfo(
        path=path, classes=list(meta["classes"]), num_classes=int(meta["num_classes"]),
        topk=int(meta["topk"]) if has_records else None, map_size=tuple(meta["map_size"]) if has_records else None,
        has_records=has_records, sizes=sizes,
        stored_sizes=np.stack([img["height"], img["width"]], 1).astype(np.int64),
        targets=np.asarray(label, dtype=np.int64).reshape(-1), valid_ids=np.flatnonzero(valid_mask).astype(np.int64),
        record_lengths=record_lengths, num_invalid=int((~valid_mask).sum()),
        num_one_hot=int(meta.get("num_one_hot", 0)),
        skipped=[tuple(s) for s in meta.get("skipped", [])], paths=meta.get("paths"),
        image_hashes=(np.frombuffer(base64.b64decode(meta["image_hashes"]), "<u8").astype(np.uint64)
                      if "image_hashes" in meta else None),
        content_hashes=(np.frombuffer(base64.b64decode(meta["image_content_hashes"]), "<u8").astype(np.uint64)
                        if "image_content_hashes" in meta else None),
        image_spans=packed_image_spans(reader))


def packed_image_spans(reader) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, sizes)`` (int64 ``[N]``) of every sample's image bytes in a ``.beton``, from its
    image metadata and allocation table."""
    md = reader.metadata[f"f{FIELDS.index('image')}"]
    ptrs = np.asarray(md["data_ptr"], dtype=np.int64)
    table = reader.alloc_table
    order = np.argsort(table["ptr"], kind="stable")
    sorted_ptrs = np.asarray(table["ptr"], dtype=np.int64)[order]
    pos = np.clip(np.searchsorted(sorted_ptrs, ptrs), 0, max(len(sorted_ptrs) - 1, 0))
    if len(sorted_ptrs) == 0 or np.any(sorted_ptrs[pos] != ptrs):
        raise ValueError(f"{reader.file_name}: image pointers missing from the allocation table; the file is damaged")
    return ptrs, np.asarray(table["size"], dtype=np.int64)[order][pos]
