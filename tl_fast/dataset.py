"""ImageFolder index with an image-size cache, and the join of its images with a label store.

``ImageFolderIndex(root)`` lists ``root/<class>/<image>`` like torchvision's ``ImageFolder`` (classes
sorted by name, ids in that order) and records each image's ``(height, width)`` read once from its
header (PIL opens files lazily, so only the header is parsed). The geometry plan needs those sizes:
random resized crop depends on them. The index is cached in ``root/.tl_fast_index.npz`` (or, when
``root`` is read-only, under ``$TL_FAST_CACHE`` / ``~/.cache/tl_fast/index``) and rebuilt whenever
the list of files or their byte sizes change.

Bad input policy (docs/spec.md section 6):

* the folder walk (:func:`scan_image_folder`) cannot loop: it remembers every directory it entered
  by ``(st_dev, st_ino)``, so a symlink back up the tree (``loop -> ..``) is entered once; FIFOs,
  sockets, devices, dangling and looping file symlinks named like images are **counted skips**;
* an image the validity rule of :mod:`tl_fast.imagecheck` refuses (unreadable header, corrupt or
  truncated JPEG data, 16-bit samples, CMYK JPEG) is a **counted skip**: it is left out of the index,
  listed in ``index.skipped`` with the reason and reported with one warning (``bad_images="error"``
  raises instead). ``tl-fast check IMAGES`` runs the thorough check (full decodes) and caches its
  verdicts beside the index; the index applies them too;
* an empty class folder is an **error** naming the folder (``allow_empty_classes=True`` keeps it as a
  class without images, so class ids stay those of the sorted folder names);
* an image without a label record is an **error** naming the image (``missing_labels="one_hot"`` makes
  it a counted fall-back to a one-hot map of the image's class);
* a store from another dataset (class count differs, or too few images have a record) is an error;
  so is a store whose recorded image fingerprints differ from the images' (``mismatched_images=
  "accept"`` lets it load with a warning).
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .imagecheck import ImageCheck, check_image, file_kind, jpeg_checker_available

if TYPE_CHECKING:  # pragma: no cover
    from .store import LabelStore

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Image files no reader takes (torchvision's ImageFolder lists the first five): counted skips, named
# in the skip report, so a folder of them is not silently smaller than the user thinks.
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".heic", ".heif", ".avif",
                          ".jxl", ".jp2", ".j2k", ".ico", ".tga", ".dng")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
CACHE_NAME = ".tl_fast_index.npz"
_CACHE_VERSION = 3  # 3: the pixel limit and the content formats of tl_fast.imagecheck
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


@dataclass
class SkippedImage:
    path: str  # relative to the root
    reason: str


@dataclass
class FolderScan:
    """What :func:`scan_image_folder` found: ``classes`` (sorted folder names), ``paths`` of the
    image files (relative, '/'-separated, in ImageFolder order), their ``byte_sizes`` and
    ``mtimes_ns``, and the entries it ``skipped`` (with the reason)."""

    root: Path
    classes: list[str]
    paths: list[str]
    byte_sizes: list[int]
    mtimes_ns: list[int]
    skipped: list[SkippedImage]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _unread_image_reason(name: str) -> str:
    """Why a file with an image extension no reader takes is skipped (``""``: not such a file)."""
    if name.startswith(".") or not name.lower().endswith(OTHER_IMAGE_EXTENSIONS):
        return ""
    ext = os.path.splitext(name)[1].lower()
    return (f"{ext} image: no reader takes {ext} files (tl_fast reads {', '.join(IMAGE_EXTENSIONS)}); convert it "
            "to JPEG or PNG")


def key_problem(rel_path: str) -> str:
    """Why the file at ``rel_path`` (relative to the root) cannot have a label-store key (``""``: it
    can): a newline or carriage return in its path, or bytes that are not UTF-8."""
    if "\n" in rel_path or "\r" in rel_path:
        return "its path contains a newline or carriage return, which a label-store key cannot hold: rename it"
    try:
        rel_path.encode("utf-8")
    except UnicodeEncodeError:
        return "its path is not valid UTF-8, which a label-store key must be: rename it"
    return ""


def scan_image_folder(root: str | os.PathLike, *, allow_empty_classes: bool = False) -> FolderScan:
    """List ``root/<class>/**/<image>`` like torchvision's ImageFolder, in a walk that cannot loop.

    Classes are the sorted names of ``root``'s non-hidden sub-directories (symlinks to directories
    count); within a class, a directory's image files come in name order, then its sub-directories in
    name order, recursively. Directory symlinks are followed, but every directory is entered at most
    once (by ``(st_dev, st_ino)``): a second way into one is a skip. Entries named like images that
    are not regular files (FIFOs, sockets, devices) and file symlinks that are dangling or loop are
    skips with the reason; nothing is opened, so a FIFO cannot block the walk."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and _is_dir(e))
    if not classes:
        raise ValueError(f"{root} has no class folders; expected the ImageFolder layout root/<class>/<image>")
    root_st = os.stat(root)
    visited: dict[tuple[int, int], str] = {(root_st.st_dev, root_st.st_ino): "."}
    scan = FolderScan(root, classes, [], [], [], [])
    empty = []
    for c in classes:
        before = len(scan.paths)
        _walk(root, c, visited, scan)
        if len(scan.paths) == before:
            empty.append(c)
    if empty and not allow_empty_classes:
        raise ValueError(f"empty class folder(s) under {root}: {', '.join(empty[:5])}; remove them or pass "
                         "allow_empty_classes=True to keep them as classes without images")
    return scan


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False for dangling ones
    except OSError:
        return False


def _walk(root: Path, rel_dir: str, visited: dict, scan: FolderScan) -> None:
    path = os.path.join(root, rel_dir)
    try:
        st = os.stat(path)
    except OSError as err:
        scan.skipped.append(SkippedImage(rel_dir, f"unreadable directory ({err.strerror or err})"))
        return
    key = (st.st_dev, st.st_ino)
    if key in visited:
        scan.skipped.append(SkippedImage(rel_dir, f"directory already listed as {visited[key]!r} "
                                                  "(a symlink loop or a second link to it): not entered again"))
        return
    visited[key] = rel_dir
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as err:
        scan.skipped.append(SkippedImage(rel_dir, f"unreadable directory ({err.strerror or err})"))
        return
    subdirs = []
    for e in entries:
        rel = f"{rel_dir}/{e.name}"
        if _is_dir(e):
            subdirs.append(rel)
            continue
        if not _is_image_name(e.name):
            reason = _unread_image_reason(e.name)
            if reason:
                scan.skipped.append(SkippedImage(rel, reason))
            continue
        reason = key_problem(rel)
        if reason:
            scan.skipped.append(SkippedImage(rel, reason))
            continue
        try:
            est = e.stat()  # follows a symlink
        except OSError as err:
            if e.is_symlink():
                reason = "symlink loop" if err.errno == errno.ELOOP else "dangling symlink"
                scan.skipped.append(SkippedImage(rel, f"{reason} ({os.readlink(os.path.join(path, e.name))!r})"))
            else:
                scan.skipped.append(SkippedImage(rel, f"cannot stat file ({err.strerror or err})"))
            continue
        if not stat.S_ISREG(est.st_mode):
            scan.skipped.append(SkippedImage(rel, f"not a regular file ({file_kind(est.st_mode)})"))
            continue
        scan.paths.append(rel)
        scan.byte_sizes.append(int(est.st_size))
        scan.mtimes_ns.append(int(est.st_mtime_ns))
    for sub in subdirs:
        _walk(root, sub, visited, scan)


def _summary(items: Sequence[SkippedImage]) -> str:
    listing = "; ".join(f"{s.path if s.path.isprintable() else repr(s.path)}: {s.reason}" for s in items[:5])
    return listing + (f" (and {len(items) - 5} more)" if len(items) > 5 else "")


class ImageFolderIndex:
    """Index of an ImageFolder-layout directory: classes, relative paths, class ids, image sizes.

    Attributes: ``root``, ``classes`` (sorted folder names), ``paths`` (relative, '/'-separated),
    ``targets`` (int64 class ids), ``sizes`` (int64 ``[N, 2]`` = (height, width)), ``keys`` (store keys),
    ``byte_sizes`` and ``fingerprints`` (int64 ``[N]`` file sizes, uint64 ``[N]`` content hashes, see
    :func:`tl_fast.imagecheck.fingerprint_bytes`), ``skipped`` (entries left out, with the reason:
    those of the folder walk, then those the validity rule refused).
    """

    def __init__(
        self, root: str | os.PathLike, *, bad_images: str = "skip", allow_empty_classes: bool = False,
        cache_dir: str | os.PathLike | None = None, num_threads: int = 8, progress: bool = True,
    ) -> None:
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        self.root = Path(root)
        scan = scan_image_folder(self.root, allow_empty_classes=allow_empty_classes)
        self.classes = scan.classes
        files = scan.paths
        fingerprint = self._fingerprint(files, scan.byte_sizes, scan.mtimes_ns)
        cached = self._load_cache(fingerprint, cache_dir)
        if cached is None:
            if not jpeg_checker_available():
                log.warning("libturbojpeg not found: JPEGs are checked with PIL, which misses scans that end early "
                            "(install libjpeg-turbo, e.g. apt-get install libturbojpeg0)")
            checks = _check_all([str(self.root / f) for f in files], False, num_threads,
                                f"indexing {self.root.name}", progress)
            heights = np.array([c.height for c in checks], np.int64)
            widths = np.array([c.width for c in checks], np.int64)
            problems = [c.problem for c in checks]
            hashes = np.array([c.fingerprint for c in checks], np.uint64)
            self._save_cache(fingerprint, files, heights, widths, problems, hashes, cache_dir)
        else:
            heights, widths, problems, hashes = cached
        thorough = load_full_check(self.root, files, scan.byte_sizes, scan.mtimes_ns, cache_dir)
        problems = [p or t for p, t in zip(problems, thorough)]
        ok = np.array([p == "" for p in problems], dtype=bool)
        refused = [SkippedImage(f, p) for f, p in zip(files, problems) if p]
        self.skipped = scan.skipped + refused
        if self.skipped:
            if bad_images == "error":
                raise ValueError(f"{len(self.skipped)} unusable image(s) under {self.root}: {_summary(self.skipped)}")
            msg = f"skipping {len(self.skipped)} unusable image(s) under {self.root}: {_summary(self.skipped)}"
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        self.paths = [f for f, good in zip(files, ok) if good]
        class_of = {c: i for i, c in enumerate(self.classes)}
        self.targets = np.array([class_of[p.split("/", 1)[0]] for p in self.paths], dtype=np.int64)
        self.sizes = np.stack([np.asarray(heights)[ok], np.asarray(widths)[ok]], 1).astype(np.int64).reshape(-1, 2)
        self.byte_sizes = np.asarray(scan.byte_sizes, np.int64)[ok] if files else np.zeros(0, np.int64)
        self.fingerprints = np.asarray(hashes, np.uint64)[ok] if files else np.zeros(0, np.uint64)
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

    # -- caching ----------------------------------------------------------------------------------
    @staticmethod
    def _fingerprint(files: Sequence[str], byte_sizes: Sequence[int], mtimes: Sequence[int]) -> str:
        h = hashlib.sha1()
        for f, s, m in zip(files, byte_sizes, mtimes):
            h.update(f"{f}\0{s}\0{m}\n".encode())
        return h.hexdigest()

    def _cache_paths(self, cache_dir) -> list[Path]:
        return _cache_paths(self.root, CACHE_NAME, cache_dir)

    def _load_cache(self, fingerprint: str, cache_dir):
        for path in self._cache_paths(cache_dir):
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as z:
                    if int(z["version"]) != _CACHE_VERSION or str(z["fingerprint"]) != fingerprint:
                        continue
                    return z["heights"], z["widths"], [str(p) for p in z["problems"]], z["hashes"]
            except Exception as err:  # a damaged cache is rebuilt, never trusted
                log.warning("ignoring unreadable image index cache %s (%s)", path, err)
        return None

    def _save_cache(self, fingerprint, files, heights, widths, problems, hashes, cache_dir) -> None:
        if not _save_npz(self._cache_paths(cache_dir), version=_CACHE_VERSION, fingerprint=fingerprint,
                         files=np.array(files, dtype=str), heights=np.asarray(heights, np.int64),
                         widths=np.asarray(widths, np.int64), problems=np.array(problems, dtype=str),
                         hashes=np.asarray(hashes, np.uint64)):
            log.warning("could not write an image index cache for %s (read-only everywhere?)", self.root)


def _cache_paths(root: Path, name: str, cache_dir) -> list[Path]:
    """Beside the images, else under ``cache_dir`` / ``$TL_FAST_CACHE`` (a read-only image root)."""
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    fallback = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return [root / name, fallback / f"{tag}{name.replace('.tl_fast', '')}"]


def _save_npz(paths: Sequence[Path], **arrays) -> bool:
    """Write ``arrays`` atomically to the first of ``paths`` that is writable."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tl_fast_cache.", suffix=".tmp.npz")
            os.close(fd)
            try:
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return True
        except OSError:
            continue
    return False


def _check_all(paths: Sequence[str], full: bool, num_threads: int, desc: str, progress: bool) -> list[ImageCheck]:
    """:func:`tl_fast.imagecheck.check_image` of every path, in threads (the decoders release the GIL).

    The pool gets chunks of paths, not one task per image: ``Executor.map`` submits every task before
    yielding the first result (its ``chunksize`` does nothing for threads), so at ImageNet scale most
    of the time went into queueing tasks while the progress bar was not yet shown. The bar is made
    first and advances as chunks finish."""
    from tqdm import tqdm

    threads = max(1, num_threads)
    chunk = _chunk_size(len(paths), threads)
    results: list[list[ImageCheck]] = [[] for _ in range(0, len(paths), chunk)]

    def check_chunk(start: int) -> int:
        part = [check_image(p, full=full) for p in paths[start:start + chunk]]
        results[start // chunk] = part
        return len(part)

    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress or len(paths) < 2000)
    with bar, ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(check_chunk, start) for start in range(0, len(paths), chunk)]
        try:
            for done in as_completed(futures):
                bar.update(done.result())
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return [c for part in results for c in part]


def _chunk_size(n: int, threads: int, most: int = 256) -> int:
    """Paths per pool task: up to ``most``, and small enough that every thread gets several chunks
    (an even spread and a bar that moves)."""
    return max(1, min(most, -(-n // (threads * 8))))


# -- the thorough check (tl-fast check) -------------------------------------------------------------

FULL_CHECK_NAME = ".tl_fast_check.npz"


def _file_keys(files, byte_sizes, mtimes) -> np.ndarray:
    return np.array([f"{f}\0{s}\0{m}" for f, s, m in zip(files, byte_sizes, mtimes)], dtype=str)


def load_full_check(root: str | os.PathLike, files, byte_sizes, mtimes, cache_dir=None) -> list[str]:
    """Problems the thorough check (``tl-fast check``) found for ``files`` (``""``: none, or not
    checked), from its cache; a file whose size or mtime changed since is taken as not checked."""
    verdict = _read_full_check(Path(root), cache_dir)
    if not verdict:
        return [""] * len(files)
    return [verdict.get(k, "") for k in _file_keys(files, byte_sizes, mtimes)]


def _read_full_check(root: Path, cache_dir) -> dict[str, str]:
    for path in _cache_paths(root, FULL_CHECK_NAME, cache_dir):
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return dict(zip((str(k) for k in z["keys"]), (str(p) for p in z["problems"])))
            except Exception as err:
                log.warning("ignoring unreadable check cache %s (%s)", path, err)
    return {}


def full_check(root: str | os.PathLike, *, num_threads: int | None = None, cache_dir=None,
               progress: bool = True) -> tuple[int, list[SkippedImage]]:
    """Decode every image under ``root`` in full (libjpeg-turbo for JPEGs, PIL otherwise), in
    parallel, and cache the verdicts beside the index (only files changed since the last check are
    decoded again). Returns the number of entries looked at (image files and the walk's skips) and
    the unusable ones; every loader built on ``root`` afterwards skips them."""
    root = Path(root)
    scan = scan_image_folder(root, allow_empty_classes=True)
    keys = _file_keys(scan.paths, scan.byte_sizes, scan.mtimes_ns)
    known = _read_full_check(root, cache_dir)
    todo = [i for i, k in enumerate(keys) if k not in known]
    checks = _check_all([str(root / scan.paths[i]) for i in todo], True, num_threads or (os.cpu_count() or 1),
                        f"checking {root.name}", progress)
    verdict = {k: known[k] for k in keys if k in known}
    verdict.update({keys[i]: c.problem for i, c in zip(todo, checks)})
    _save_npz(_cache_paths(root, FULL_CHECK_NAME, cache_dir), keys=np.array(list(verdict), dtype=str),
              problems=np.array(list(verdict.values()), dtype=str))
    bad = [SkippedImage(scan.paths[i], verdict[k]) for i, k in enumerate(keys) if verdict[k]]
    return len(keys) + len(scan.skipped), scan.skipped + bad


# -- tl-fast check ---------------------------------------------------------------------------------

def _check_cmd(args) -> int:
    import sys

    try:
        checked, bad = full_check(args.images, num_threads=args.workers, progress=not args.quiet)
    except (OSError, ValueError) as err:
        print(f"tl-fast check: error: {err}", file=sys.stderr)
        return 1
    for s in bad:
        print(f"{s.path}: {s.reason}")
    print(f"{len(bad)} of {checked} entries unusable under {args.images}" if bad
          else f"all {checked} images under {args.images} decode cleanly")
    return 1 if bad else 0


def register(subparsers) -> None:
    """Add ``tl-fast check``."""
    p = subparsers.add_parser(
        "check", help="decode every image of a folder in full and cache the verdicts for the loaders",
        description="The thorough image check: decode every image under IMAGES (ImageFolder layout) in full "
        "(libjpeg-turbo for JPEGs, failing on its warnings; PIL for the rest), in parallel. Verdicts are cached "
        "beside the image index (IMAGES/.tl_fast_check.npz), so a rerun decodes only changed files, and every "
        "loader, pack-ffcv and annotate run on IMAGES afterwards skips the images it found unusable. Prints "
        "one line per unusable entry; exits 1 if there is any.")
    p.add_argument("images", metavar="IMAGES", help="ImageFolder-layout directory (root/<class>/<image>)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_check_cmd)


@dataclass
class LabelJoin:
    """Result of joining an image index with a store: ``record[i]`` is image i's store record id, or
    -1 when it has none (only with ``missing_labels="one_hot"``); ``missing`` lists those images."""

    record: np.ndarray
    missing: list[str]
    num_mismatched: int = 0  # images whose fingerprint differs from the store's (accepted)

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


def join_labels(index: ImageFolderIndex, store: "LabelStore", *, missing_labels: str = "error",
                mismatched_images: str = "error") -> LabelJoin:
    """Match every image of ``index`` to its record in ``store`` by key (relative path, no extension).

    An image without a record under that key takes the record of the official key, its file name
    cut at the first ``.`` (how TokenLabeling and ReLabel name label files, :func:`tl_fast.compat.official_key`);
    two images taking one record that way is a ``ValueError`` naming both.

    Raises ``ValueError`` for a store that belongs to another dataset, ``KeyError`` naming the first
    images without a record (unless ``missing_labels="one_hot"``, a counted fall-back), and
    ``ValueError`` naming the first images whose content fingerprint differs from the one the store
    recorded for them (unless ``mismatched_images="accept"``: a warning). Stores without
    fingerprints (written before version 2, or without them) are joined by key alone. From version
    3 a fingerprint is sealed to its record, so records reordered against their keys are mismatches
    too (:func:`fingerprint_mismatches`).
    """
    if missing_labels not in ("error", "one_hot"):
        raise ValueError(f"missing_labels must be 'error' or 'one_hot', got {missing_labels!r}")
    if mismatched_images not in ("error", "accept"):
        raise ValueError(f"mismatched_images must be 'error' or 'accept', got {mismatched_images!r}")
    if store.num_classes != index.num_classes:
        raise ValueError(
            f"label store has K={store.num_classes} classes but {index.root} has {index.num_classes} class folders: "
            "the store was made for another dataset (or another class list)")
    check_store_classes(store, index.classes, str(index.root))
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
                       "annotate them (a store made before they were added, or by an annotator that could not "
                       "decode them, lacks them), or pass missing_labels='one_hot' to fall back to one-hot maps")
    if missing:
        warnings.warn(f"{len(missing)} image(s) have no label record; using one-hot maps of their class for them "
                      f"(first: {missing[0]})", stacklevel=2)
    mismatched = fingerprint_mismatches(index, store, record)
    if mismatched:
        listing = "; ".join(mismatched[:3]) + (f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else "")
        msg = (f"{len(mismatched)} image(s) under {index.root} are not the images the label store {store.path} was "
               f"made for: {listing}")
        if mismatched_images == "error":
            raise ValueError(msg + "; use the store made for these images (tl-fast inspect STORE --verify IMAGES "
                             "lists every difference), or pass mismatched_images='accept' to load it anyway")
        warnings.warn(msg + " (accepted: mismatched_images='accept')", stacklevel=2)
    return LabelJoin(record, missing, len(mismatched))


def check_store_classes(store: "LabelStore", classes: Sequence[str], images: str) -> None:
    """Raise :class:`tl_fast.classes.ClassMismatch` if ``store`` records the class list its ids mean
    (``metadata["classes"]``, written by ``tl-fast annotate``) and it is not ``classes``, the folder's."""
    recorded = store.metadata.get("classes") if isinstance(store.metadata, dict) else None
    if recorded is None:
        return
    from .classes import same_classes

    same_classes(list(classes), list(recorded), what=images, reference_what=f"the label store {store.path}",
                 remedy="use the store annotated on these class folders (tl-fast annotate IMAGES STORE)")


def fingerprint_mismatches(index: ImageFolderIndex, store: "LabelStore", record: np.ndarray) -> list[str]:
    """``"path (why)"`` for every image of ``index`` whose record (``record[i]``, -1: none) carries a
    content fingerprint other than the image's, or one not sealed to the record (records reordered
    against their keys, :meth:`tl_fast.store.LabelStore.unsealed`). One vectorized comparison per
    join; the first mismatches also name the image a record was made from when it is in ``index``."""
    if store.fingerprints is None:
        return []
    sizes, hashes = store.fingerprints
    has = record >= 0
    rec = np.where(has, record, 0)
    known = has & store.has_fingerprint()[rec]
    unsealed = known & store.unsealed()[rec]
    differs = (sizes[rec] != index.byte_sizes.astype(np.uint64)) | (hashes[rec] != index.fingerprints)
    bad = np.flatnonzero(known & (differs | unsealed))
    owner: dict[tuple[int, int], str] | None = None
    out = []
    for n, i in enumerate(bad):
        r = rec[i]
        if unsealed[i]:
            why = "its label record moved: the record stored under its key was sealed to another fingerprint"
        elif int(sizes[r]) != int(index.byte_sizes[i]):
            why = f"{int(index.byte_sizes[i])} bytes, the store's image had {int(sizes[r])}"
        else:
            why = "same size, different content"
        if n < 5 and not unsealed[i]:  # a record made from another image of this folder: records shifted
            if owner is None:
                owner = {(int(b), int(h)): p for b, h, p in zip(index.byte_sizes, index.fingerprints, index.paths)}
            other = owner.get((int(sizes[r]), int(hashes[r])))
            if other is not None and other != index.paths[i]:
                why = f"its label record was made from {other}: records shifted against their keys"
        out.append(f"{index.paths[i]} ({why})")
    return out
