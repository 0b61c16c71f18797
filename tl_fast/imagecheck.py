"""The image-validity rule, decided once at indexing and applied by every backend and the annotator.

One function, :func:`check_image`, decides whether an image file is usable. Its verdict is cached
in the image index (:mod:`tl_fast.dataset`), and every consumer (the DALI, FFCV and torch loaders,
``tl-fast pack-ffcv``, ``tl-fast annotate``) takes its list of images from that index, so no backend
is handed a file another backend would refuse.

A file is **unusable** (a counted skip, with the reason) when:

* it is empty, not a regular file, or its header does not parse;
* it is a JPEG that libjpeg-turbo cannot decode *without a warning*: bad markers, a scan that ends
  early (a truncated file, also with ``FF D9`` appended), corrupt entropy-coded data. libjpeg only
  warns about these and fills the rest with grey; DALI, FFCV, torchvision and PIL then each
  deliver something different, so the warning is an error here. The quick check (the default)
  reads a JPEG with libjpeg-turbo alone (no PIL) and decodes it to 1/8-scale grey: the
  entropy-coded data of every component, where these errors are found, is decoded in full (no
  cheaper decode sees a scan that ends early), while the inverse DCT, the chroma planes'
  upsampling and the colour conversion are skipped. ``full=True`` decodes to full-size RGB;
* it is a CMYK/YCCK JPEG (decoders disagree on the colour conversion; FFCV's cannot do it);
* it has more than 8 bits per sample (12-bit JPEG, 16-bit PNG, ``I``/``F`` modes): DALI, torchvision and PIL map
  16-bit levels to 8 bits differently (correct, wrong levels, saturated white), so it is refused
  everywhere — convert such files to 8-bit;
* it has more than :data:`MAX_PIXELS` pixels (89,478,485, PIL's own default ``Image.MAX_IMAGE_PIXELS``):
  libjpeg-turbo, DALI and torchvision decode any size, but PIL, which ``tl-fast annotate`` and
  ``tl-fast pack-ffcv`` decode with, refuses larger images as decompression bombs (and warns above
  this bound). At the bound, one decoded RGB image takes 268 MB; the index refuses a larger one
  from its header alone, before anything decodes it;
* its content is not JPEG, PNG, BMP or WebP, whatever its name says (a GIF or TIFF named ``.png``:
  DALI cannot decode GIF, torchvision cannot decode TIFF);
* it is one of those formats and PIL cannot fully decode it.

Without libjpeg-turbo's ``libturbojpeg`` (it ships with FFCV's system dependencies) the JPEG check
falls back to PIL at reduced scale plus an end-of-image marker test, which misses scans that end
early; :func:`jpeg_checker_available` says which one runs.

The image's content **fingerprint** (:func:`fingerprint_bytes`) is computed from the same read: its
size in bytes and a 64-bit hash of its first and last :data:`FINGERPRINT_WINDOW` bytes. Label stores
record it per record, sealed to the record (:mod:`tl_fast.store.format`), so labels stay bound to the
images they were made for. (``.beton`` files, whose bytes are read anyway, record a hash of every
byte instead: :mod:`tl_fast.loaders.packed_hash`.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import stat
import threading
from dataclasses import dataclass

import numba
import numpy as np

FINGERPRINT_WINDOW = 2048
_TJFLAG_FASTDCT = 2048
_TJFLAG_STOPONWARNING = 8192
_TJCS_CMYK, _TJCS_YCCK = 3, 4
_TJPF_RGB, _TJPF_GRAY = 0, 6
_ALLOWED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr")
# What PIL calls the content formats every reader decodes (MPO: a camera JPEG with extra frames).
_ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP")
# The most pixels an image may have: PIL's default decompression-bomb bound (it warns above it and
# refuses above twice it), so every reader, PIL included, decodes every image the index accepts.
MAX_PIXELS = 89_478_485


def pixel_problem(height: int, width: int) -> str:
    """The validity rule's verdict on an image's size alone (``""``: within :data:`MAX_PIXELS`)."""
    if height * width <= MAX_PIXELS:
        return ""
    return (f"{width}x{height} = {height * width:,} pixels, over the limit of {MAX_PIXELS:,} every reader shares "
            "(tl_fast.imagecheck.MAX_PIXELS, PIL's decompression-bomb bound): downscale it")


@dataclass(frozen=True)
class ImageCheck:
    """Verdict on one file: ``problem`` is ``""`` for a usable image."""

    height: int
    width: int
    problem: str
    nbytes: int = 0
    fingerprint: int = 0  # uint64 as a Python int (0 when the file could not be read)


# -- fingerprint -----------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True)
def _mix_bytes(h: np.uint64, part: np.ndarray) -> np.uint64:
    word = np.uint64(0)
    shift = np.uint64(0)
    for i in range(part.shape[0]):
        word |= np.uint64(part[i]) << shift
        shift += np.uint64(8)
        if shift == np.uint64(64):
            h = (h ^ word) * np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(32)
            word = np.uint64(0)
            shift = np.uint64(0)
    h = (h ^ word ^ (shift << np.uint64(56))) * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(29))


@numba.njit(cache=True, nogil=True)
def _windows_hash(head: np.ndarray, tail: np.ndarray, n: int) -> np.uint64:
    """The hash of a file of ``n`` bytes from its head window and its tail window (the bytes after
    the head, at most ``FINGERPRINT_WINDOW`` of them)."""
    h = np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(n)
    return _mix_bytes(_mix_bytes(h, head), tail)


@numba.njit(cache=True, nogil=True)
def _bytes_hash(data: np.ndarray) -> np.uint64:
    n = data.shape[0]
    head = min(n, FINGERPRINT_WINDOW)
    return _windows_hash(data[:head], data[max(head, n - FINGERPRINT_WINDOW):], n)


def fingerprint_bytes(data) -> tuple[int, int]:
    """``(size, hash)`` of a file's bytes: the content fingerprint stores and ``.beton`` files record
    (the hash reads only the first and last ``FINGERPRINT_WINDOW`` bytes)."""
    arr = data.reshape(-1) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    return int(arr.shape[0]), int(_bytes_hash(arr))


def file_fingerprint(path: str | os.PathLike) -> tuple[int, int]:
    """:func:`fingerprint_bytes` of the file at ``path``, reading only its two windows."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = np.frombuffer(f.read(FINGERPRINT_WINDOW), np.uint8)
        tail_start = max(len(head), size - FINGERPRINT_WINDOW)
        f.seek(tail_start)
        tail = np.frombuffer(f.read(size - tail_start), np.uint8)
    return size, int(_windows_hash(head, tail, size))


@numba.njit(cache=True, nogil=True)
def packed_fingerprints(buf: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Hashes of the byte ranges ``buf[offsets[i]:offsets[i] + sizes[i]]`` (e.g. JPEGs in a mapped
    ``.beton``), as :func:`fingerprint_bytes` computes them."""
    out = np.empty(offsets.shape[0], np.uint64)
    for i in range(offsets.shape[0]):
        o = offsets[i]
        out[i] = _bytes_hash(buf[o:o + sizes[i]])
    return out


# -- libjpeg-turbo ---------------------------------------------------------------------------------

class _TurboJPEG:
    """The few libturbojpeg calls the check needs (ctypes releases the GIL: checks run in threads)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.tjInitDecompress.restype = ctypes.c_void_p
        lib.tjDestroy.argtypes = [ctypes.c_void_p]
        lib.tjGetErrorStr2.restype = ctypes.c_char_p
        lib.tjGetErrorStr2.argtypes = [ctypes.c_void_p]
        lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + \
            [ctypes.POINTER(ctypes.c_int)] * 4
        lib.tjDecompress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._local = threading.local()

    def _handle(self):
        h = getattr(self._local, "handle", None)
        if h is None:
            h = self._local.handle = self.lib.tjInitDecompress()
        return h

    def _failed(self, h) -> str:
        """libjpeg-turbo's message for the failed call on ``h``, and a fresh handle for the next
        call: a failure can leave the decompressor mid-header, so the next file would be parsed
        as a continuation of this one ("two SOI markers")."""
        msg = self.lib.tjGetErrorStr2(h).decode(errors="replace")
        self.lib.tjDestroy(h)
        self._local.handle = None
        return msg

    def inspect(self, data: bytes, full: bool) -> tuple[int, int, str]:
        """``(height, width, problem)`` of the JPEG ``data``: ``problem`` is ``""`` when it decodes
        without error or warning, else what libjpeg-turbo said. The quick check (``full=False``)
        decodes to 1/8-scale grey: every entropy-coded byte of every component is still decoded
        (that is where a scan that ends early shows), while the inverse DCT, upsampling and colour
        conversion of the chroma components are skipped."""
        h = self._handle()
        w, ht, sub, cs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if self.lib.tjDecompressHeader3(h, data, len(data), ctypes.byref(w), ctypes.byref(ht), ctypes.byref(sub),
                                        ctypes.byref(cs)):
            msg = self._failed(h)
            depth = jpeg_precision(data)
            if depth not in (0, 8):
                return 0, 0, f"{depth}-bit JPEG: backends decode only 8-bit JPEGs (convert it to 8-bit)"
            return 0, 0, f"corrupt JPEG header (libjpeg-turbo: {msg})"
        if w.value <= 0 or ht.value <= 0:
            return 0, 0, "zero-sized image"
        if cs.value in (_TJCS_CMYK, _TJCS_YCCK):
            return ht.value, w.value, "CMYK/YCCK JPEG: decoders disagree on its colours (convert it to RGB)"
        too_big = pixel_problem(ht.value, w.value)
        if too_big:
            return ht.value, w.value, too_big
        scale, pixel = (1, _TJPF_RGB) if full else (8, _TJPF_GRAY)
        ow, oh = -(-w.value // scale), -(-ht.value // scale)
        out = np.empty(ow * oh * (3 if full else 1), np.uint8)
        if self.lib.tjDecompress2(h, data, len(data), out.ctypes.data, ow, 0, oh, pixel,
                                  _TJFLAG_STOPONWARNING | _TJFLAG_FASTDCT):
            msg = self._failed(h)
            if "premature end" in msg.lower():
                return ht.value, w.value, f"truncated or corrupt JPEG: its scan data ends early (libjpeg-turbo: {msg})"
            return ht.value, w.value, f"corrupt JPEG data (libjpeg-turbo: {msg})"
        return ht.value, w.value, ""


def jpeg_precision(data: bytes) -> int:
    """Bits per sample in the JPEG ``data``'s frame header (0 when no frame header is found)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return 0
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            return data[i + 4] if i + 4 < len(data) else 0
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before it
            return 0
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return 0


def _load_turbojpeg() -> _TurboJPEG | None:
    for name in (ctypes.util.find_library("turbojpeg"), "libturbojpeg.so.0", "libturbojpeg.dylib"):
        if not name:
            continue
        try:
            return _TurboJPEG(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None


_TURBO = _load_turbojpeg()


def jpeg_checker_available() -> bool:
    """Whether JPEGs are checked by libjpeg-turbo (else the weaker PIL fall-back)."""
    return _TURBO is not None


# -- the rule --------------------------------------------------------------------------------------

def _read_regular_file(path: str) -> bytes:
    """The bytes of ``path``; refuses anything but a regular file without blocking on it (a FIFO)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({file_kind(mode)})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """A short name for a non-regular file type (FIFO, socket, device...)."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def check_image(path: str | os.PathLike, *, full: bool = False) -> ImageCheck:
    """The verdict of the validity rule (module docstring) on the file at ``path``."""
    from PIL import Image

    path = os.fspath(path)
    try:
        data = _read_regular_file(path)
    except OSError as err:
        return ImageCheck(0, 0, f"unreadable file ({err.strerror or err})")
    nbytes, fp = fingerprint_bytes(data)
    if not data:
        return ImageCheck(0, 0, "empty file", nbytes, fp)
    if _TURBO is not None and data[:3] == b"\xff\xd8\xff":  # JPEG: libjpeg-turbo alone, no PIL
        height, width, problem = _TURBO.inspect(data, full)
        return ImageCheck(height, width, problem, nbytes, fp)

    def bad(problem: str, h: int = 0, w: int = 0) -> ImageCheck:
        return ImageCheck(h, w, problem, nbytes, fp)

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt, mode = im.format, im.mode
            if width <= 0 or height <= 0:
                return bad("zero-sized image")
            if fmt not in _ALLOWED_FORMATS:
                return bad(f"{fmt} data (whatever the file name says): the readers share JPEG, PNG, BMP and WebP "
                           "only (convert it to one of them)", height, width)
            if pixel_problem(height, width):
                return bad(pixel_problem(height, width), height, width)
            if fmt == "PNG" and len(data) > 24 and data[24] > 8:
                return bad(f"{data[24]}-bit PNG: backends convert it to 8 bits differently (convert it to 8-bit)")
            if mode not in _ALLOWED_MODES and not (fmt == "JPEG" and mode == "CMYK"):
                return bad(f"image mode {mode} (more than 8 bits per sample?): convert it to 8-bit RGB")
            if fmt != "JPEG":
                im.load()  # PNG/BMP/WebP: rare in training sets, so fully decoded here
    except Image.UnidentifiedImageError:
        return bad("not an image (unknown format or unreadable header)")
    except Image.DecompressionBombError as err:  # over twice MAX_PIXELS: PIL refuses to open it at all
        return bad(f"over the limit of {MAX_PIXELS:,} pixels every reader shares (tl_fast.imagecheck.MAX_PIXELS; "
                   f"PIL: {err}): downscale it")
    except Exception as err:  # PIL raises many types for unreadable files
        return bad(f"unreadable image ({type(err).__name__}: {err})")
    if fmt == "JPEG":
        if _TURBO is not None:
            problem = _TURBO.inspect(data, full)[2]
        else:
            problem = _pil_jpeg_problem(data, full)
        if problem:
            return bad(problem)
    return ImageCheck(height, width, "", nbytes, fp)


def _pil_jpeg_problem(data: bytes, full: bool) -> str:
    from PIL import Image

    if b"\xff\xd9" not in data[-4096:]:
        return "truncated JPEG (no end-of-image marker)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "CMYK":
                return "CMYK/YCCK JPEG: decoders disagree on its colours (convert it to RGB)"
            if not full:
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except Exception as err:
        return f"corrupt JPEG data ({type(err).__name__}: {err})"
    return ""
