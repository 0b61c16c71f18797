"""``tl-fast pack-ffcv IMAGES STORE OUT.beton``: images, class ids, sample ids and label records in one
FFCV file (plus ``OUT.beton.json``: classes and the store's geometry).

``tl-fast pack-ffcv IMAGES OUT.beton --no-labels`` (``pack_ffcv(images, None, out)``) packs images,
class ids and sample ids only, with no label-record field (``"has_records": false`` in the JSON): for
evaluation splits and class-label training, which never read token-label maps.

Images are stored as JPEG. A JPEG no larger than ``--max-side`` is stored byte for byte (no second
lossy encoding, so FFCV decodes exactly what the other backends decode); larger or non-JPEG images
are resized (longer side = ``--max-side``, bilinear with antialiasing) and encoded at
``--jpeg-quality``. The original size is kept in the image metadata, because the geometry plan is a
function of it; the FFCV decoder maps the plan's box into the stored pixels proportionally.

A 64-bit hash of every packed image's bytes goes into the JSON (``image_content_hashes``); the
FFCV backend verifies it where its pipeline reads the bytes (:mod:`tl_fast.loaders.packed_hash`).

Bad input: an image that fails to decode at pack time is a counted skip (stored as a 1x1 placeholder,
listed in the JSON as ``invalid`` and never sampled); an image without a label record is an error
naming it unless ``--missing-labels one_hot``. The output is written to a temporary file and renamed,
so an interrupted pack leaves no ``.beton`` that loads.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import warnings

import numpy as np

from ..dataset import ONE_HOT_SCORE, ImageFolderIndex, join_labels

JPEG_MAGIC = b"\xff\xd8"


def _placeholder_jpeg() -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="JPEG")
    return np.frombuffer(buf.getvalue(), np.uint8)


class _PackSource:
    """Indexed dataset for FFCV's writer: ``(image, label, index, record)`` per sample, or
    ``(image, label, index)`` when ``records`` is None."""

    def __init__(self, paths, sizes, targets, records, max_side: int | None, quality: int) -> None:
        self.paths, self.sizes, self.targets, self.records = paths, sizes, targets, records
        self.max_side, self.quality = max_side, quality

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, i: int):
        """``(jpeg bytes, stored h, stored w, orig h, orig w)``; raises for an undecodable file."""
        from PIL import Image

        path = self.paths[i]
        oh, ow = (int(v) for v in self.sizes[i])
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # full decode: a corrupt file fails here, at pack time
            if im.size != (ow, oh):
                raise ValueError(f"{path} is {im.size[1]}x{im.size[0]} but was indexed as {oh}x{ow}")
            scale = 1.0 if not self.max_side else min(1.0, self.max_side / max(oh, ow))
            if scale == 1.0 and im.format == "JPEG" and im.mode in ("RGB", "L") and raw[:2] == JPEG_MAGIC:
                return np.frombuffer(raw, np.uint8), oh, ow, oh, ow
            rgb = im.convert("RGB")
            if scale < 1.0:
                sw, sh = max(1, round(ow * scale)), max(1, round(oh * scale))
                rgb = rgb.resize((sw, sh), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            rgb.save(buf, format="JPEG", quality=self.quality)
            return np.frombuffer(buf.getvalue(), np.uint8), rgb.size[1], rgb.size[0], oh, ow

    def __getitem__(self, i: int):
        try:
            image = self.image(i)
        except Exception as err:  # counted skip: recorded by the placeholder's zero original size
            warnings.warn(f"pack-ffcv: skipping {self.paths[i]}: {err}")
            image = (_placeholder_jpeg(), 1, 1, 0, 0)
        if self.records is None:
            return image, int(self.targets[i]), i
        return image, int(self.targets[i]), i, self.records[i]


def _one_hot_record(cls: int, topk: int, map_size) -> np.ndarray:
    from ..store import encode_record

    h, w = map_size
    values = np.zeros((topk, h, w), np.float16)
    values[0] = ONE_HOT_SCORE
    indices = np.full((topk, h, w), cls, np.int64)
    return encode_record(values, indices)[0]


def pack_ffcv(images: str, store_path: str | None, out: str, *, max_side: int | None = None, jpeg_quality: int = 90,
              num_workers: int = 4, missing_labels: str = "error", mismatched_images: str = "error",
              progress: bool = True) -> dict:
    """Write ``out`` (+ ``out.json``); returns the description written to the JSON.

    ``store_path=None`` packs no label records (``missing_labels`` is then unused): the file serves
    loaders without token labels (``train=False``, ``token_labels=False`` or plain class labels)."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must lie in [1, 100], got {jpeg_quality}")
    if num_workers < 1:
        raise ValueError(f"the number of writer processes must be >= 1, got {num_workers}")

    from ..store import LabelStore
    from .ffcv import (  # first: it checks that FFCV is installed
        FORMAT, FORMAT_VERSION, META_SUFFIX, PlanRGBImageField, packed_image_spans)
    from .packed_hash import packed_content_hashes

    from ffcv.fields import BytesField, IntField
    from ffcv.writer import DatasetWriter

    index = ImageFolderIndex(images, progress=progress)
    store = records = None
    num_one_hot = 0
    if store_path is not None:
        store = LabelStore.open(store_path)
        join = join_labels(index, store, missing_labels=missing_labels, mismatched_images=mismatched_images)
        records = [store.record_bytes(int(r)) if r >= 0
                   else _one_hot_record(int(index.targets[i]), store.topk, store.map_size)
                   for i, r in enumerate(join.record)]
        num_one_hot = join.num_missing
    paths = [index.abspath(i) for i in range(len(index))]
    source = _PackSource(paths, index.sizes, index.targets, records, max_side, jpeg_quality)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=".pack-ffcv.", suffix=".beton")
    os.close(fd)
    try:
        fields = {"image": PlanRGBImageField(), "label": IntField(), "index": IntField()}
        if records is not None:
            fields["record"] = BytesField()
        writer = DatasetWriter(tmp, fields, num_workers=max(1, num_workers))
        writer.from_indexed_dataset(source, chunksize=64)
        from ffcv.reader import Reader

        reader = Reader(tmp, custom_handlers={"image": PlanRGBImageField})
        md = reader.metadata["f0"]
        invalid = np.flatnonzero(md["orig_height"] == 0).tolist()
        offsets, sizes = packed_image_spans(reader)
        hashes = packed_content_hashes(np.memmap(tmp, dtype=np.uint8, mode="r"), offsets, sizes)
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "source": os.path.abspath(images),
            "store": None if store is None else os.path.abspath(store_path), "num_samples": len(index),
            "classes": index.classes, "num_classes": index.num_classes if store is None else store.num_classes,
            "topk": None if store is None else store.topk, "map_size": None if store is None else list(store.map_size),
            "has_records": store is not None, "max_side": max_side, "jpeg_quality": jpeg_quality, "invalid": invalid,
            "invalid_paths": [index.paths[i] for i in invalid], "num_one_hot": num_one_hot,
            "skipped_at_index": [s.path for s in index.skipped],
            "paths": index.paths,
            "image_content_hashes": base64.b64encode(hashes.astype("<u8").tobytes()).decode(),
            "skipped": [[s.path, s.reason] for s in index.skipped]
            + [[index.paths[i], "failed to decode at pack time"] for i in invalid],
        }
        meta_tmp = tmp + ".json"
        with open(meta_tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, out)
        os.replace(meta_tmp, out + META_SUFFIX)
    finally:
        for p in (tmp, tmp + ".json"):
            if os.path.exists(p):
                os.unlink(p)
    if invalid:
        warnings.warn(f"pack-ffcv: {len(invalid)} image(s) failed to decode and are skipped: "
                      f"{', '.join(meta['invalid_paths'][:5])}")
    return meta


def _run(args: argparse.Namespace) -> int:
    if args.no_labels and args.store is not None:
        args.parser.error(f"--no-labels packs no label store; got one ({args.store}): drop it or drop --no-labels")
    if not args.no_labels and args.store is None:
        args.parser.error("missing STORE: pack-ffcv IMAGES STORE OUT.beton, or IMAGES OUT.beton --no-labels "
                          "for a file without token labels")
    from ..store import StoreError

    try:
        meta = pack_ffcv(args.images, args.store, args.out, max_side=args.max_side, jpeg_quality=args.jpeg_quality,
                         num_workers=args.workers, missing_labels=args.missing_labels,
                         mismatched_images="accept" if args.accept_mismatched_images else "error")
    except KeyError as err:  # a missing record: KeyError's str() would quote the message
        print(f"tl-fast pack-ffcv: error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, StoreError) as err:
        print(f"tl-fast pack-ffcv: error: {err}", file=sys.stderr)
        return 1
    n_bad = len(meta["invalid"]) + len(meta["skipped_at_index"])
    labels = f"{meta['num_one_hot']} one-hot fall-backs" if meta["has_records"] else "no label records"
    print(f"wrote {args.out}: {meta['num_samples'] - len(meta['invalid'])} samples, {len(meta['classes'])} classes, "
          f"{n_bad} skipped, {labels}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pack-ffcv", help="pack an image folder and its label store (or no labels) into one FFCV .beton",
        usage="%(prog)s IMAGES STORE OUT.beton [options]\n       %(prog)s IMAGES OUT.beton --no-labels [options]",
        description="Pack IMAGES (ImageFolder layout) and the label STORE into OUT.beton for backend='ffcv'. "
        "With --no-labels (and no STORE) it packs images and class ids only, no token-label records: for "
        "validation splits or class-label training (loading token labels from such a file is an error).")
    p.add_argument("images", metavar="IMAGES", help="ImageFolder-layout directory (root/<class>/<image>)")
    p.add_argument("store", metavar="STORE", nargs="?",
                   help="label store of those images (tl-fast annotate / convert-pt); omitted with --no-labels")
    p.add_argument("out", metavar="OUT.beton", help="output .beton (a .beton.json description is written beside it)")
    p.add_argument("--no-labels", action="store_true",
                   help="pack no label records (no STORE): the file cannot serve token labels")
    p.add_argument("--max-side", type=int, default=None, help="downscale images whose longer side exceeds N")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded images (default 90)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--missing-labels", choices=("error", "one_hot"), default="error",
                   help="images without a record: error (default) or a one-hot map of their class")
    p.add_argument("--accept-mismatched-images", action="store_true",
                   help="pack even if images differ from the ones the store recorded (size/content fingerprint)")
    p.set_defaults(func=_run, parser=p)
