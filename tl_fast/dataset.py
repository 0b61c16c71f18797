"""ImageFolder index with an image-size cache, and the join of its images with a label store.

``ImageFolderIndex(root)`` lists ``root/<class>/<image>`` like torchvision's ``ImageFolder`` (classes
sorted by name, ids in that order) and records each image's ``(height, width)`` read once from its
header (PIL opens files lazily, so only the header is parsed). The geometry plan needs those sizes:
random resized crop depends on them. The index is cached in ``root/.tl_fast_index.npz`` (or, when
``root`` is read-only, under ``$TL_FAST_CACHE`` / ``~/.cache/tl_fast/index``) and rebuilt whenever
the list of files or their byte sizes change.

Bad input policy (SPEC section 6):

* a file whose header cannot be parsed, or a JPEG without an end-of-image marker (truncated), is a
  **counted skip**: it is left out of the index, listed in ``index.skipped`` and reported with one
  warning (``bad_images="error"`` raises instead);
* an empty class folder is an **error** naming the folder (``allow_empty_classes=True`` keeps it as a
  class without images, so class ids stay those of the sorted folder names);
* an image without a label record is an **error** naming the image (``missing_labels="one_hot"`` makes
  it a counted fall-back to a one-hot map of the image's class);
* a store from another dataset (class count differs, or too few images have a record) is an error.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .store import LabelStore

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
CACHE_NAME = ".tl_fast_index.npz"
_CACHE_VERSION = 1
# A JPEG must carry its end-of-image marker (FF D9) near its end; some writers pad after it.
_EOI_TAIL = 4096
# Below this share of images with a record, a store is taken to describe another dataset.
MIN_MATCH_FRACTION = 0.5
# Score given to the image's class in a one-hot fall-back map: softmax over K <= 10^5 classes
# then puts more than 0.9999 of the mass on that class.
ONE_HOT_SCORE = 20.0


def image_key(rel_path: str) -> str:
    """The store key of an image: its path relative to the root, '/'-separated, without extension."""
    rel = rel_path.replace(os.sep, "/")
    return os.path.splitext(rel)[0]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("TL_FAST_CACHE", Path.home() / ".cache" / "tl_fast")) / "index"


def _read_header(path: str) -> tuple[int, int, str | None]:
    """``(height, width, problem)`` of one image; ``problem`` is None for a usable file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
    except Exception as err:  # PIL raises several types for unreadable headers
        return 0, 0, f"unreadable header ({type(err).__name__}: {err})"
    if width <= 0 or height <= 0:
        return 0, 0, "zero-sized image"
    if fmt == "JPEG":
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - _EOI_TAIL))
                tail = f.read()
        except OSError as err:
            return 0, 0, f"unreadable file ({err})"
        if b"\xff\xd9" not in tail:
            return 0, 0, "truncated JPEG (no end-of-image marker)"
    return height, width, None


@dataclass
class SkippedImage:
    path: str  # relative to the root
    reason: str


class ImageFolderIndex:
    """Index of an ImageFolder-layout directory: classes, relative paths, class ids, image sizes.

    Attributes: ``root``, ``classes`` (sorted folder names), ``paths`` (relative, '/'-separated),
    ``targets`` (int64 class ids), ``sizes`` (int64 ``[N, 2]`` = (height, width)), ``keys`` (store keys),
    ``skipped`` (files left out, with the reason).
    """

    def __init__(
        self, root: str | os.PathLike, *, bad_images: str = "skip", allow_empty_classes: bool = False,
        cache_dir: str | os.PathLike | None = None, num_threads: int = 8, progress: bool = True,
    ) -> None:
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.classes, files, byte_sizes = self._scan(allow_empty_classes)
        fingerprint = self._fingerprint(files, byte_sizes)
        cached = self._load_cache(fingerprint, cache_dir)
        if cached is None:
            heights, widths, problems = self._read_sizes(files, num_threads, progress)
            self._save_cache(fingerprint, files, heights, widths, problems, cache_dir)
        else:
            heights, widths, problems = cached
        ok = np.array([p == "" for p in problems], dtype=bool)
        self.skipped = [SkippedImage(f, p) for f, p in zip(files, problems) if p]
        if self.skipped:
            listing = "; ".join(f"{s.path}: {s.reason}" for s in self.skipped[:5])
            more = f" (and {len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            if bad_images == "error":
                raise ValueError(f"{len(self.skipped)} unusable image(s) under {self.root}: {listing}{more}")
            warnings.warn(f"skipping {len(self.skipped)} unusable image(s) under {self.root}: {listing}{more}",
                          stacklevel=2)
        self.paths = [f for f, good in zip(files, ok) if good]
        class_of = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.array([class_of[p.split("/", 1)[0]] for p in self.paths], dtype=np.int64)
        self.sizes = np.stack([np.asarray(heights)[ok], np.asarray(widths)[ok]], 1).astype(np.int64).reshape(-1, 2)
        self.keys = [image_key(p) for p in self.paths]
        if not self.paths:
            raise ValueError(f"no usable images under {self.root}")
        if not allow_empty_classes:
            counts = np.bincount(self.targets, minlength=len(self.classes))
            empty = [c for c, n in zip(self.classes, counts) if n == 0]
            if empty:
                raise ValueError(f"class folder(s) without usable images under {self.root}: {', '.join(empty[:5])}; "
                                 "remove them or pass allow_empty_classes=True to keep them as classes")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def abspath(self, i: int) -> str:
        return str(self.root / self.paths[i])

    # -- scanning and caching -------------------------------------------------------------------
    def _scan(self, allow_empty: bool) -> tuple[list[str], list[str], list[int]]:
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise ValueError(f"{self.root} has no class folders; expected the ImageFolder layout root/<class>/<image>")
        files: list[str] = []
        byte_sizes: list[int] = []
        empty = []
        for c in classes:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root / c, followlinks=True):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
                for name in sorted(filenames):
                    if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                        rel = f"{rel_dir}/{name}"
                        found.append(rel)
                        byte_sizes.append(os.stat(os.path.join(dirpath, name)).st_size)
            if not found:
                empty.append(c)
            files.extend(found)
        if empty and not allow_empty:
            raise ValueError(f"empty class folder(s) under {self.root}: {', '.join(empty[:5])}; remove them or pass "
                             "allow_empty_classes=True to keep them as classes without images")
        return classes, files, byte_sizes

    @staticmethod
    def _fingerprint(files: Sequence[str], byte_sizes: Sequence[int]) -> str:
        h = hashlib.sha1()
        for f, s in zip(files, byte_sizes):
            h.update(f"{f}\0{s}\n".encode())
        return h.hexdigest()

    def _cache_paths(self, cache_dir) -> list[Path]:
        tag = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:16]
        fallback = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        return [self.root / CACHE_NAME, fallback / f"{tag}.npz"]

    def _load_cache(self, fingerprint: str, cache_dir):
        for path in self._cache_paths(cache_dir):
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    if int(z["version"]) != _CACHE_VERSION or str(z["fingerprint"]) != fingerprint:
                        continue
                    return z["heights"], z["widths"], [str(p) for p in z["problems"]]
            except Exception as err:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable image index cache %s (%s)", path, err)
        return None

    def _save_cache(self, fingerprint, files, heights, widths, problems, cache_dir) -> None:
        for path in self._cache_paths(cache_dir):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tl_fast_index.", suffix=".tmp.npz")
                os.close(fd)
                try:
                    np.savez(tmp, version=_CACHE_VERSION, fingerprint=fingerprint, files=np.array(files, dtype=str),
                             heights=np.asarray(heights, np.int64), widths=np.asarray(widths, np.int64),
                             problems=np.array(problems, dtype=str))
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                return
            except OSError:
                continue
        log.warning("could not write an image index cache for %s (read-only everywhere?)", self.root)

    def _read_sizes(self, files, num_threads: int, progress: bool):
        from tqdm import tqdm

        paths = [str(self.root / f) for f in files]
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            it = pool.map(_read_header, paths, chunksize=64)
            res = list(tqdm(it, total=len(paths), desc=f"indexing {self.root.name}", unit="img",
                            disable=not progress or len(paths) < 2000))
        heights = np.array([r[0] for r in res], dtype=np.int64)
        widths = np.array([r[1] for r in res], dtype=np.int64)
        problems = [r[2] or "" for r in res]
        return heights, widths, problems


@dataclass
class LabelJoin:
    """Result of joining an image index with a store: ``record[i]`` is image i's store record id, or
    -1 when it has none (only with ``missing_labels="one_hot"``); ``missing`` lists those images."""

    record: np.ndarray
    missing: list[str]

    @property
    def num_missing(self) -> int:
        return len(self.missing)


def _official_key_fallback(index: ImageFolderIndex, keys, position: dict, record: np.ndarray) -> np.ndarray:
    """``record`` with images that have none matched by the official key rule instead, if unambiguous."""
    from .compat import official_key

    missing = np.flatnonzero(record < 0)
    if len(missing) == 0:
        return record
    record = record.copy()
    owner = {int(r): int(i) for i, r in enumerate(record) if r >= 0}  # record -> image taking it
    for i in missing:
        r = position.get(official_key(index.paths[i]), -1)
        if r < 0:
            continue
        if r in owner:
            raise ValueError(
                f"images {index.paths[owner[r]]!r} and {index.paths[i]!r} both match the label record {keys[r]!r} "
                "(the second by the official rule: its name cut at the first '.'): the store cannot tell them "
                "apart; rename one, or key the store by the names without their last extension")
        owner[r] = int(i)
        record[i] = r
    return record


def join_labels(index: ImageFolderIndex, store: "LabelStore", *, missing_labels: str = "error") -> LabelJoin:
    """Match every image of ``index`` to its record in ``store`` by key (relative path, no extension).

    An image without a record under that key takes the record of the official key, its file name
    cut at the first ``.`` (how TokenLabeling and ReLabel name label files, :func:`tl_fast.compat.official_key`);
    two images taking one record that way is a ``ValueError`` naming both.

    Raises ``ValueError`` for a store that belongs to another dataset, ``KeyError`` naming the first
    images without a record (unless ``missing_labels="one_hot"``, a counted fall-back).
    """
    if missing_labels not in ("error", "one_hot"):
        raise ValueError(f"missing_labels must be 'error' or 'one_hot', got {missing_labels!r}")
    if store.num_classes != index.num_classes:
        raise ValueError(
            f"label store has K={store.num_classes} classes but {index.root} has {index.num_classes} class folders: "
            "the store was made for another dataset (or another class list)")
    position = {k: i for i, k in enumerate(store.keys)}
    record = np.array([position.get(k, -1) for k in index.keys], dtype=np.int64)
    record = _official_key_fallback(index, store.keys, position, record)
    missing_ids = np.flatnonzero(record < 0)
    matched = len(record) - len(missing_ids)
    if matched < MIN_MATCH_FRACTION * len(record):
        example_store = store.keys[0] if len(store.keys) else "(empty store)"
        raise ValueError(
            f"label store matches only {matched} of {len(record)} images under {index.root} "
            f"(image key {index.keys[missing_ids[0]]!r} has no record; store keys look like {example_store!r}): "
            "it was made for another dataset or with another image root")
    missing = [index.paths[i] for i in missing_ids]
    if missing and missing_labels == "error":
        listing = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise KeyError(f"{len(missing)} image(s) under {index.root} have no label record: {listing}; "
                       "annotate them, or pass missing_labels='one_hot' to fall back to one-hot maps")
    if missing:
        warnings.warn(f"{len(missing)} image(s) have no label record; using one-hot maps of their class for them "
                      f"(first: {missing[0]})", stacklevel=2)
    return LabelJoin(record, missing)
