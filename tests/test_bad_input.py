"""Bad input never becomes a silent wrong batch (issue 16): folder walks that cannot loop, one
image-validity rule for every backend, fingerprints binding labels to images, failures that name
the file, one-line argument errors. Every bad input is generated here."""
from __future__ import annotations

import io
import json
import os
import socket
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from test_loader_helpers import exploding_ffcv_op, make_folder, make_store
from tl_fast.dataset import ImageFolderIndex, full_check, scan_image_folder
from tl_fast.imagecheck import check_image, file_fingerprint, fingerprint_bytes, jpeg_checker_available
from tl_fast.loaders import TokenLabelLoader
from tl_fast.plan import AugmentConfig

S, P = 32, 8
NO_RA = AugmentConfig(randaugment=None)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _jpeg_bytes(h=48, w=64, seed=0, **save) -> bytes:
    rs = np.random.RandomState(seed)
    coarse = rs.randint(0, 256, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **save)
    return buf.getvalue()


def _noisy_jpeg(h=96, w=128, seed=0) -> bytes:
    """A JPEG with a long scan (noise), so cutting it leaves a scan that ends early."""
    img = np.random.RandomState(seed).randint(0, 256, size=(h, w, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _bad_files(folder) -> dict[str, str]:
    """Write the issue's corrupt images into ``folder``; returns name -> expected words of the reason."""
    good = _noisy_jpeg()
    with open(os.path.join(folder, "cut_ffd9.jpg"), "wb") as f:  # truncated, end-of-image marker appended
        f.write(good[: len(good) // 2] + b"\xff\xd9")
    mid = bytearray(good)
    mid[len(good) // 2:len(good) // 2 + 64] = np.random.RandomState(1).randint(0, 256, 64).astype(np.uint8).tobytes()
    with open(os.path.join(folder, "scan_noise.jpg"), "wb") as f:  # random bytes in the middle of the scan
        f.write(bytes(mid))
    Image.fromarray(np.full((20, 30), 40000, np.uint16)).save(os.path.join(folder, "deep.png"))  # 16-bit PNG
    Image.new("CMYK", (30, 20), (10, 200, 30, 0)).save(os.path.join(folder, "cmyk.jpg"), quality=95)
    with open(os.path.join(folder, "garbage.jpg"), "wb") as f:
        f.write(os.urandom(300))
    open(os.path.join(folder, "empty.jpg"), "wb").close()
    deep_jpeg = bytearray(_jpeg_bytes())
    sof = deep_jpeg.index(b"\xff\xc0")
    deep_jpeg[sof + 4] = 12  # the frame header says 12 bits per sample
    with open(os.path.join(folder, "deep12.jpg"), "wb") as f:
        f.write(bytes(deep_jpeg))
    return {"cut_ffd9.jpg": "ends early", "scan_noise.jpg": "JPEG", "deep.png": "16-bit",
            "cmyk.jpg": "CMYK", "garbage.jpg": "not an image", "empty.jpg": "empty", "deep12.jpg": "12-bit JPEG"}


# -- 1. walks that cannot loop ----------------------------------------------------------------------

def test_directory_symlink_loop_is_entered_once(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 2})
    os.makedirs(os.path.join(root, "a", "sub"))
    Image.new("RGB", (20, 20)).save(os.path.join(root, "a", "sub", "x.jpg"))
    os.symlink("..", os.path.join(root, "a", "loop"))  # back to the root: every class again, forever
    os.symlink("../a", os.path.join(root, "b", "again"))  # a second way into class a
    index = _quiet(ImageFolderIndex, root, progress=False)
    assert len(index) == 6
    assert index.paths == ["a/000.jpg", "a/001.jpg", "a/002.jpg", "a/sub/x.jpg", "b/000.jpg", "b/001.jpg"]
    reasons = {s.path: s.reason for s in index.skipped}
    assert "already listed" in reasons["a/loop"] and "already listed as 'a'" in reasons["b/again"]


def test_fifos_sockets_and_bad_symlinks_are_counted_skips(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 2})
    a = os.path.join(root, "a")
    os.mkfifo(os.path.join(a, "fifo.jpg"))  # opening it would block the indexer forever
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(os.path.join(a, "sock.jpg"))
    except OSError:  # a socket path is limited to ~107 bytes; a deep tmp dir exceeds it
        os.mkfifo(os.path.join(a, "sock.jpg"))
    os.symlink("nowhere.jpg", os.path.join(a, "dangling.jpg"))
    os.symlink("loop2.jpg", os.path.join(a, "loop1.jpg"))
    os.symlink("loop1.jpg", os.path.join(a, "loop2.jpg"))
    os.symlink("000.jpg", os.path.join(a, "alias.jpg"))  # a good file symlink is an image like any other
    try:
        scan = scan_image_folder(root)
        reasons = {s.path: s.reason for s in scan.skipped}
        assert scan.paths == ["a/000.jpg", "a/001.jpg", "a/alias.jpg"]
        assert "FIFO" in reasons["a/fifo.jpg"] and ("socket" in reasons["a/sock.jpg"] or "FIFO" in reasons["a/sock.jpg"])
        assert "dangling" in reasons["a/dangling.jpg"] and "loop" in reasons["a/loop1.jpg"]
        with pytest.warns(UserWarning, match="skipping 5 unusable"):
            loader = TokenLabelLoader(root, None, backend="torch", batch_size=1, image_size=S, patch_size=P,
                                      num_workers=0, device="cpu", train=False)
        assert loader.num_skipped == 5 and {s.path for s in loader.skipped} == set(reasons)
        assert sum(len(b) for b in loader) == 3
    finally:
        sock.close()


# -- 2. one validity rule ---------------------------------------------------------------------------

@pytest.mark.skipif(not jpeg_checker_available(), reason="libturbojpeg not installed")
def test_validity_rule_refuses_each_corrupt_image_with_its_reason(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    expected = _bad_files(os.path.join(root, "a"))
    index = _quiet(ImageFolderIndex, root, progress=False)
    reasons = {s.path: s.reason for s in index.skipped}
    assert len(index) == 4 and set(reasons) == {f"a/{n}" for n in expected}
    for name, words in expected.items():
        assert words in reasons[f"a/{name}"], (name, reasons[f"a/{name}"])
    # A refused file leaves the thread's decompressor fit for the next file (one thread, in turn).
    for name in expected:
        check_image(os.path.join(root, "a", name))
        assert check_image(os.path.join(root, index.paths[0])).problem == "", name
    # The good files pass both the quick and the full decode.
    for p in index.paths:
        assert check_image(os.path.join(root, p)).problem == "" == check_image(os.path.join(root, p), full=True).problem
    # An 8-bit PNG and a progressive JPEG are images like any other.
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(os.path.join(root, "b", "ok.png"))
    with open(os.path.join(root, "b", "prog.jpg"), "wb") as f:
        f.write(_jpeg_bytes(progressive=True))
    assert {"b/ok.png", "b/prog.jpg"} <= set(_quiet(ImageFolderIndex, root, progress=False).paths)


@pytest.mark.skipif(not jpeg_checker_available(), reason="libturbojpeg not installed")
@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_every_backend_delivers_exactly_the_valid_images(tmp_path, backend):
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    n_bad = len(_bad_files(os.path.join(root, "a")))
    store = _quiet(make_store, root, tmp_path / "labels.tls")
    images = root
    if backend == "ffcv":
        images = str(tmp_path / "x.beton")
        _quiet(pack_ffcv, root, store, images, num_workers=1, progress=False)
    loader = _quiet(TokenLabelLoader, images, store, backend=backend, batch_size=2, image_size=S, patch_size=P,
                    num_workers=1 if backend != "torch" else 0, device="cpu", augment=NO_RA, erase=None,
                    drop_last=False)
    assert loader.num_skipped == n_bad and len({s.path for s in loader.skipped}) == n_bad
    seen = sorted(int(i) for b in loader for i in b.indices)
    assert len(seen) == 6 and all(torch.isfinite(b.images).all() for b in loader)


def test_full_check_is_cached_and_applied_by_the_index(tmp_path, monkeypatch):
    import tl_fast.dataset as dataset

    root = make_folder(tmp_path / "imgs", {"a": 3})
    with open(os.path.join(root, "a", "garbage.jpg"), "wb") as f:
        f.write(os.urandom(200))
    checked, bad = full_check(root, progress=False)
    assert checked == 4 and [s.path for s in bad] == ["a/garbage.jpg"]
    assert os.path.isfile(os.path.join(root, ".tl_fast_check.npz"))
    # A verdict only the full decode reaches is applied by every later index of the folder.
    real = dataset.check_image
    monkeypatch.setattr(dataset, "check_image", lambda p, full=False: real(p, full=full) if not (
        full and p.endswith("001.jpg")) else dataset.ImageCheck(1, 1, "full decode failed"))
    os.utime(os.path.join(root, "a", "001.jpg"))  # changed since the last check: decoded again
    calls = []
    orig_check_all = dataset._check_all
    monkeypatch.setattr(dataset, "_check_all", lambda paths, *a, **k: calls.append(len(paths)) or
                        orig_check_all(paths, *a, **k))
    full_check(root, progress=False)
    assert calls == [1]  # only the changed file
    index = _quiet(ImageFolderIndex, root, progress=False)
    assert {s.path: s.reason for s in index.skipped}["a/001.jpg"] == "full decode failed"
    assert len(index) == 2


def test_check_command_prints_one_line_per_bad_image(tmp_path, capsys):
    from tl_fast.cli import main

    root = make_folder(tmp_path / "imgs", {"a": 2})
    with open(os.path.join(root, "a", "garbage.jpg"), "wb") as f:
        f.write(os.urandom(200))
    assert main(["check", root, "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "a/garbage.jpg: not an image" in out and "1 of 3" in out
    assert main(["check", str(tmp_path / "nope")]) == 1
    assert "tl-fast check: error:" in capsys.readouterr().err


def test_fingerprint_reads_only_the_two_windows(tmp_path):
    for n in (0, 7, 2048, 3000, 4096, 9000):
        data = os.urandom(n)
        (tmp_path / "f").write_bytes(data)
        assert file_fingerprint(tmp_path / "f") == fingerprint_bytes(data) and fingerprint_bytes(data)[0] == n
    data = bytearray(os.urandom(9000))
    base = fingerprint_bytes(bytes(data))
    data[10] ^= 1
    assert fingerprint_bytes(bytes(data)) != base  # the head counts
    data[10] ^= 1
    data[-3] ^= 1
    assert fingerprint_bytes(bytes(data)) != base  # the tail counts


def _exif_rotated_folder(root):
    """``root/a/0.jpg``: left half red, right half green, with EXIF saying "rotate 90 degrees"."""
    os.makedirs(root / "a")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img = np.zeros((40, 64, 3), np.uint8)
    img[:, :32, 0] = 255
    img[:, 32:, 1] = 255
    Image.fromarray(img).save(root / "a" / "0.jpg", quality=95, exif=exif)
    return root


def test_exif_orientation_is_ignored_alike_by_every_backend(tmp_path):
    """DALI rotates by EXIF orientation unless told not to; the index, the plan and the other
    backends take the stored pixel grid, so a rotated photo would be cropped in the wrong place."""
    root = _exif_rotated_folder(tmp_path / "imgs")
    got = {}
    for backend in ("torch", "dali"):
        loader = TokenLabelLoader(str(root), None, backend=backend, batch_size=1, image_size=S, patch_size=P,
                                  num_workers=1 if backend == "dali" else 0, device="cpu", train=False, drop_last=False)
        got[backend] = next(iter(loader)).images
    assert (got["torch"] - got["dali"]).abs().mean() < 0.05


# -- 3. fingerprints bind labels to images ----------------------------------------------------------

def _fingerprinted_store(images_root, path, seed=0) -> str:
    """A store like make_store's, recording every image's content fingerprint."""
    from tl_fast.store import StoreWriter

    index = _quiet(ImageFolderIndex, images_root, progress=False)
    rs = np.random.RandomState(seed)
    with StoreWriter(path, num_classes=index.num_classes, topk=2, map_size=(4, 4)) as w:
        for i, key in enumerate(index.keys):
            values = np.sort(rs.rand(2, 4, 4).astype(np.float16) * 5, axis=0)[::-1].copy()
            ids = rs.randint(0, index.num_classes, size=(2, 4, 4))
            w.add(key, values, ids, fingerprint=file_fingerprint(index.abspath(i)))
    return str(path)


def test_store_for_other_images_with_the_same_paths_is_an_error(tmp_path):
    train = make_folder(tmp_path / "train", {"a": 3, "b": 3}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 3, "b": 3}, seed=1)  # same file names, other images
    store = _fingerprinted_store(train, tmp_path / "train.tls")
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, num_workers=0, device="cpu")
    assert len(list(TokenLabelLoader(train, store, **kw))) == 3
    with pytest.raises(ValueError, match=r"6 image\(s\) under .* are not the images .*a/000.jpg") as err:
        TokenLabelLoader(val, store, **kw)
    assert "\n" not in str(err.value) and "mismatched_images='accept'" in str(err.value)
    with pytest.warns(UserWarning, match="accepted"):
        TokenLabelLoader(val, store, mismatched_images="accept", **kw)
    # One image rewritten with the same size is caught by the content hash.
    path = os.path.join(train, "b", "001.jpg")
    raw = bytearray(open(path, "rb").read())
    raw[100] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"b/001.jpg \(same size, different content\)"):
        TokenLabelLoader(train, store, **kw)


def test_store_without_fingerprints_and_version_1_stores_still_open(tmp_path, capsys):
    import zlib

    from tl_fast.store import LabelStore
    from tl_fast.store.format import CRC_OFFSET, HEADER_SIZE, unpack_header

    images = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    plain = _quiet(make_store, images, tmp_path / "plain.tls")
    assert LabelStore.open(plain).fingerprints is None
    # A version 1 file: the same bytes with version 1 in the header (bytes 112-127 zero) and its crc.
    raw = bytearray(open(plain, "rb").read())
    raw[8:12] = (1).to_bytes(4, "little")
    raw[CRC_OFFSET:CRC_OFFSET + 4] = bytes(4)
    hdr = unpack_header(bytes(raw[:HEADER_SIZE]))
    crc = zlib.crc32(bytes(raw[:HEADER_SIZE]))
    crc = zlib.crc32(bytes(raw[hdr["index_offset"]:hdr["meta_offset"] + hdr["meta_bytes"]]), crc)
    raw[CRC_OFFSET:CRC_OFFSET + 4] = crc.to_bytes(4, "little")
    v1 = tmp_path / "v1.tls"
    v1.write_bytes(bytes(raw))
    store = LabelStore.open(v1)
    assert store.header["version"] == 1 and store.fingerprints is None
    assert torch.equal(store.read([0, 3]).values, LabelStore.open(plain).read([0, 3]).values)
    loader = TokenLabelLoader(images, str(v1), backend="torch", batch_size=2, image_size=S, patch_size=P,
                              num_workers=0, device="cpu")
    assert len(list(loader)) == 2
    fp = LabelStore.open(_fingerprinted_store(images, tmp_path / "fp.tls"))
    assert fp.header["version"] == 3 and fp.has_fingerprint().all() and not fp.unsealed().any()
    assert tuple(int(v[1]) for v in fp.fingerprints) == file_fingerprint(os.path.join(images, "a", "001.jpg"))
    # A version 2 file: fingerprints without seals. It opens, and its fingerprints are compared.
    v2 = tmp_path / "v2.tls"
    v2.write_bytes(_as_version_2(open(fp.path, "rb").read()))
    old = LabelStore.open(v2)
    assert old.header["version"] == 2 and old.seals is None and old.has_fingerprint().all()
    assert all(np.array_equal(a, b) for a, b in zip(old.fingerprints, fp.fingerprints))
    assert len(list(TokenLabelLoader(images, str(v2), backend="torch", batch_size=2, image_size=S, patch_size=P,
                                     num_workers=0, device="cpu"))) == 2
    from tl_fast.cli import main

    assert main(["inspect", str(v2), "--verify", images]) == 0
    assert "not sealed to its records (format version 2)" in capsys.readouterr().out


def _recrc(raw: bytearray) -> bytearray:
    """``raw`` (a store's bytes) with its header crc recomputed over header, index, manifest,
    metadata and fingerprint section: what a deliberate rewrite of the file would leave."""
    import zlib

    from tl_fast.store.format import CRC_OFFSET, HEADER_SIZE, fingerprint_columns, unpack_header

    raw[CRC_OFFSET:CRC_OFFSET + 4] = bytes(4)
    hdr = unpack_header(bytes(raw[:HEADER_SIZE]))
    crc = zlib.crc32(bytes(raw[:HEADER_SIZE]))
    crc = zlib.crc32(bytes(raw[hdr["index_offset"]:hdr["meta_offset"] + hdr["meta_bytes"]]), crc)
    fo, n = hdr["fingerprint_offset"], hdr["num_records"]
    if fo:
        crc = zlib.crc32(bytes(raw[fo:fo + 8 * fingerprint_columns(hdr["version"]) * n]), crc)
    raw[CRC_OFFSET:CRC_OFFSET + 4] = crc.to_bytes(4, "little")
    return raw


def _as_version_2(data: bytes) -> bytes:
    """A version 3 store with fingerprints rewritten as version 2 (no seal column)."""
    from tl_fast.store.format import HEADER_SIZE, pack_header, unpack_header

    hdr = unpack_header(data[:HEADER_SIZE])
    hdr["version"], hdr["file_size"] = 2, hdr["file_size"] - 8 * hdr["num_records"]
    raw = bytearray(data[:hdr["file_size"]])
    raw[:HEADER_SIZE] = pack_header(**hdr)
    return bytes(_recrc(raw))


def _rotate_index_rows(data: bytes) -> bytes:
    """The store ``data`` with its records' index rows (offset, length, checksum) rotated by one and
    the header crc redone: every record still matches its index checksum, keys and fingerprints
    stay where they were, so each key now points at its neighbour's record."""
    from tl_fast.store.format import HEADER_SIZE, unpack_header

    hdr = unpack_header(data[:HEADER_SIZE])
    n, io = hdr["num_records"], hdr["index_offset"]
    raw = bytearray(data)
    for start, width in ((io, 8), (io + 8 * n, 4), (io + 12 * n, 4)):
        col = bytes(raw[start:start + width * n])
        raw[start:start + width * n] = col[width:] + col[:width]
    return bytes(_recrc(raw))


def test_records_rotated_under_the_same_keys_fail_the_join(tmp_path, capsys):
    """A fingerprint that stays with its key cannot see records shifted against the keys: in
    version 3 it is sealed to its record's checksum, so it moves with the record."""
    from tl_fast.cli import main
    from tl_fast.store import LabelStore, StoreError, StoreWriter

    images = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    store = LabelStore.open(_fingerprinted_store(images, tmp_path / "labels.tls"))
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, num_workers=0, device="cpu")
    # 1. The file's index rows rotated (a tool that reordered records and rewrote the crc).
    rotated = tmp_path / "rotated.tls"
    rotated.write_bytes(_rotate_index_rows(open(store.path, "rb").read()))
    moved = LabelStore.open(rotated)
    moved.read(range(len(moved)))  # each record is intact and matches its index checksum
    assert moved.unsealed().all()
    with pytest.raises(ValueError, match=r"6 image\(s\) .* a/000.jpg \(its label record moved.*a/001.jpg") as err:
        TokenLabelLoader(images, str(rotated), **kw)
    assert "\n" not in str(err.value)
    assert main(["inspect", str(rotated), "--verify", images]) == 1
    assert "6 image(s) differing" in capsys.readouterr().out
    assert main(["inspect", str(rotated), "--verify"]) == 1
    assert "moved against their image fingerprints" in capsys.readouterr().err
    with pytest.raises(StoreError, match="moved against"), StoreWriter(tmp_path / "copy.tls", num_classes=2, topk=2,
                                                                          map_size=(4, 4)) as w:
        w.copy_from(moved)  # a copy does not launder it
    # The same rotation of a version 2 file (fingerprints without seals) is not seen: why version 3 seals them.
    v2 = tmp_path / "rotated_v2.tls"
    v2.write_bytes(_rotate_index_rows(_as_version_2(open(store.path, "rb").read())))
    assert len(list(TokenLabelLoader(images, str(v2), **kw))) == 3
    # 2. Records rewritten shifted by one under the same keys, each with the fingerprint it was made from.
    shifted = tmp_path / "shifted.tls"
    n = len(store)
    with StoreWriter(shifted, num_classes=store.num_classes, topk=store.topk, map_size=store.map_size) as w:
        for i, key in enumerate(store.keys):
            j = (i + 1) % n
            w.add_encoded(key, store.record_bytes(j), int(store._checksums[j]),
                          fingerprint=(int(store.fingerprints[0][j]), int(store.fingerprints[1][j])))
    with pytest.raises(ValueError, match=r"a/000.jpg \(its label record was made from a/001.jpg: records shifted"):
        TokenLabelLoader(images, str(shifted), **kw)


def test_inspect_verify_images_checks_a_store_against_a_folder(tmp_path, capsys):
    from tl_fast.cli import main

    train = make_folder(tmp_path / "train", {"a": 3, "b": 3}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 3, "b": 3}, seed=1)
    store = _fingerprinted_store(train, tmp_path / "train.tls")
    assert main(["inspect", store, "--verify", train]) == 0
    assert "store matches the images" in capsys.readouterr().out
    assert main(["inspect", "--verify", val, store]) == 1
    out = capsys.readouterr().out
    assert "6 image(s) differing" in out and "a/000.jpg" in out and "does NOT match" in out
    os.remove(os.path.join(train, "a", "002.jpg"))
    Image.new("RGB", (20, 20)).save(os.path.join(train, "b", "new.jpg"))
    assert main(["inspect", store, "--verify", train]) == 1
    out = capsys.readouterr().out
    assert "1 image(s) without a record: b/new.jpg" in out and "1 record(s) without an image: a/002" in out
    assert main(["inspect", "--verify", store]) == 0  # records only, as before


def _overwrite(path: str, offset: int, nbytes: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(x ^ 0x5A for x in old))


def test_beton_hashes_every_packed_image_byte_and_refuses_changed_bytes(tmp_path):
    import base64

    from ffcv.reader import Reader

    from tl_fast.imagecheck import packed_fingerprints
    from tl_fast.loaders.ffcv import PlanRGBImageField, packed_image_spans
    from tl_fast.loaders.ffcv_pack import pack_ffcv
    from tl_fast.loaders.packed_hash import content_hash

    images = make_folder(tmp_path / "imgs", {"a": 4, "b": 4}, smooth=False, size_range=(80, 96))  # 10+ KB each
    store = _fingerprinted_store(images, tmp_path / "labels.tls")
    beton = str(tmp_path / "x.beton")
    meta = _quiet(pack_ffcv, images, store, beton, num_workers=1, progress=False)
    hashes = np.frombuffer(base64.b64decode(meta["image_content_hashes"]), "<u8")
    # JPEGs are packed byte for byte: the recorded hash is the source file's.
    src = np.fromfile(os.path.join(images, meta["paths"][2]), np.uint8)
    assert int(hashes[2]) == int(content_hash(src))
    kw = dict(backend="ffcv", batch_size=2, image_size=S, patch_size=P, num_workers=2, device="cpu", augment=NO_RA,
              erase=None)
    assert len(list(TokenLabelLoader(beton, store, **kw))) == 4
    offsets, sizes = packed_image_spans(Reader(beton, custom_handlers={"image": PlanRGBImageField}))
    assert sizes.min() > 3 * 2048
    mm = lambda: np.fromfile(beton, np.uint8)  # noqa: E731
    windows = packed_fingerprints(mm(), offsets, sizes)
    _overwrite(beton, int(offsets[5] + sizes[5] // 2))  # the middle of sample 5's JPEG, outside both 2 KB windows
    assert np.array_equal(packed_fingerprints(mm(), offsets, sizes), windows)  # the old check could not see it
    with pytest.raises(RuntimeError, match=r"changed since pack time \(" + meta["paths"][5]):
        list(TokenLabelLoader(beton, store, **kw))
    # A version 3 file (hashes of the first and last 2 KB) still loads, with its window check.
    v3 = str(tmp_path / "v3.beton")
    _quiet(pack_ffcv, images, store, v3, num_workers=1, progress=False)
    with open(v3 + ".json") as f:
        old = json.load(f)
    del old["image_content_hashes"]
    old["version"] = 3
    old["image_hashes"] = base64.b64encode(packed_fingerprints(np.fromfile(v3, np.uint8), offsets, sizes)
                                           .astype("<u8").tobytes()).decode()
    with open(v3 + ".json", "w") as f:
        json.dump(old, f)
    assert len(list(TokenLabelLoader(v3, store, **kw))) == 4
    _overwrite(v3, int(offsets[4]) + 700)
    with pytest.raises(RuntimeError, match=r"changed since pack time \(" + meta["paths"][4]):
        list(TokenLabelLoader(v3, store, **kw))


# -- 4. failures surface with the file and the cause ------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_store_shrinking_under_a_running_loader_is_a_clear_error(tmp_path, backend):
    images = make_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    store = _quiet(make_store, images, tmp_path / "labels.tls")
    loader = TokenLabelLoader(images, store, backend=backend, batch_size=2, image_size=S, patch_size=P,
                              num_workers=1, device="cpu", augment=NO_RA)
    it = iter(loader)
    next(it)
    os.truncate(store, os.path.getsize(store) // 2)
    with pytest.raises(Exception, match="changed since it was opened .its size went from"):
        for _ in it:
            pass
    with pytest.raises(Exception, match="labels.tls: the label store file changed"):
        next(iter(loader))  # and at the next epoch start


def test_beton_changed_under_the_loader_is_an_error_at_epoch_start(tmp_path):
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    images = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    beton = str(tmp_path / "x.beton")
    _quiet(pack_ffcv, images, None, beton, num_workers=1, progress=False)
    loader = TokenLabelLoader(beton, None, backend="ffcv", batch_size=2, image_size=S, patch_size=P, num_workers=1,
                              device="cpu", train=False)
    assert len(list(loader)) == 2
    os.truncate(beton, os.path.getsize(beton) - 100)
    with pytest.raises(RuntimeError, match="x.beton: the packed file changed .*size went from"):
        list(loader)


def test_damaged_packed_record_names_the_image(tmp_path):
    from ffcv.reader import Reader

    from tl_fast.loaders.ffcv import PlanRGBImageField
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    images = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    store = _quiet(make_store, images, tmp_path / "labels.tls")
    beton = str(tmp_path / "x.beton")
    meta = _quiet(pack_ffcv, images, store, beton, num_workers=1, progress=False)
    ptr = int(Reader(beton, custom_handlers={"image": PlanRGBImageField}).metadata["f3"]["ptr"][3])
    with open(beton, "r+b") as f:
        f.seek(ptr + 40)
        b = f.read(1)
        f.seek(ptr + 40)
        f.write(bytes([b[0] ^ 0xFF]))
    loader = TokenLabelLoader(beton, store, backend="ffcv", batch_size=2, image_size=S, patch_size=P, num_workers=1,
                              device="cpu", augment=NO_RA, drop_last=False)
    with pytest.raises(Exception, match="label record packed for " + meta["paths"][3] + " is damaged"):
        list(loader)


def test_dali_decode_failure_names_the_file(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 4})
    loader = TokenLabelLoader(root, None, backend="dali", batch_size=2, image_size=S, patch_size=P, num_workers=1,
                              device="cpu", train=False)
    path = os.path.join(root, "a", "002.jpg")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:  # same size, garbage after the SOI marker
        f.write(raw[:2] + os.urandom(len(raw) - 4) + b"\xff\xd9")
    with pytest.raises(RuntimeError, match="DALI failed on image .*002.jpg"):
        list(loader)


# -- 5. argument errors are one clear line ----------------------------------------------------------

@pytest.mark.parametrize("bad, words", [
    ({"patch_size": 0}, "patch_size must be a positive integer"),
    ({"image_size": 0}, "image_size must be a positive integer"),
    ({"num_workers": -1}, "num_workers must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"mismatched_images": "maybe"}, "mismatched_images must be one of"),
])
def test_loader_argument_errors_are_one_line(tmp_path, bad, words):
    root = make_folder(tmp_path / "imgs", {"a": 2})
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, num_workers=0, device="cpu")
    kw.update(bad)
    with pytest.raises(ValueError, match=words) as err:
        TokenLabelLoader(root, None, **kw)
    assert "\n" not in str(err.value)


def test_model_and_loader_class_count_mismatch_is_a_clear_error(tmp_path):
    images = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    store = _quiet(make_store, images, tmp_path / "labels.tls")
    batch = next(iter(TokenLabelLoader(images, store, backend="torch", batch_size=2, image_size=S, patch_size=P,
                                       num_workers=0, device="cpu")))
    tokens = (S // P) ** 2
    with pytest.raises(ValueError, match="model predicts 10 classes but the loader's labels have K=2"):
        batch.loss(torch.zeros(2, 10), torch.zeros(2, tokens, 10))
    batch.loss(torch.zeros(2, 2), torch.zeros(2, tokens, 2))


def test_pack_ffcv_errors_are_one_line(tmp_path, capsys):
    from tl_fast.cli import main

    images = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    partial = _quiet(make_store, images, tmp_path / "partial.tls", drop={"a/001"})
    out = str(tmp_path / "x.beton")
    for argv, words in [([images, partial, out], "have no label record: a/001.jpg"),
                        ([str(tmp_path / "nope"), partial, out], "does not exist"),
                        ([images, str(tmp_path / "none.tls"), out], "none.tls"),
                        ([images, partial, out, "--max-side", "0"], "max_side must be")]:
        assert main(["pack-ffcv", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("tl-fast pack-ffcv: error:") and words in err and "\n" not in err, err
    assert not os.path.exists(out)


def test_killed_writer_temporaries_are_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys
    import textwrap

    from tl_fast.cli import main

    src = tmp_path / "pt"
    os.makedirs(src / "a")
    for i in range(3):
        torch.save(torch.zeros(2, 2, 3, 3, dtype=torch.float16), src / "a" / f"{i}.pt")
    dst = tmp_path / "out" / "labels.tls"
    os.makedirs(dst.parent)
    # A writer killed mid-way (kill -9) leaves its temporary behind.
    code = textwrap.dedent(f"""
        import os, signal
        from tl_fast.store import StoreWriter
        w = StoreWriter({str(dst)!r}, num_classes=3, topk=2, map_size=(3, 3))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", code], cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert [p for p in os.listdir(dst.parent) if p.endswith(".tmp")]
    assert main(["convert-pt", str(src), str(dst), "--quiet"]) == 0
    assert sorted(os.listdir(dst.parent)) == ["labels.tls"]


def test_ffcv_pipeline_failure_names_the_batch_images(tmp_path):
    from ffcv.loader import OrderOption

    from tl_fast.loaders.ffcv import PlanCropDecoder, PlanRGBImageField, _GuardedLoader, add_plan_columns
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    images = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    beton = str(tmp_path / "x.beton")
    meta = _quiet(pack_ffcv, images, None, beton, num_workers=1, progress=False)
    loader = _GuardedLoader(beton, batch_size=2, num_workers=1, order=OrderOption.SEQUENTIAL,
                            pipelines={"image": [PlanCropDecoder(S), exploding_ffcv_op()], "label": None,
                                       "index": None},
                            custom_fields={"image": PlanRGBImageField}, drop_last=False)
    add_plan_columns(loader)  # whole images, unflipped
    loader.timeout_s = 60
    loader.sample_name = lambda i: meta["paths"][i]
    with pytest.raises(RuntimeError, match=r"failed on a batch of 2 images \(a/000.jpg, a/001.jpg\).*exploding"):
        for _ in loader:
            pass


def test_store_command_argument_errors_are_one_line(tmp_path, capsys):
    from tl_fast.cli import main

    images = make_folder(tmp_path / "imgs", {"a": 2})
    store = _quiet(make_store, images, tmp_path / "labels.tls")
    for argv, words in [(["convert-pt", str(tmp_path), str(tmp_path / "o.tls"), "--workers", "-1"], "workers must be"),
                        (["inspect", store, "--sample", "0"], "sample must be"),
                        (["inspect", store, "--verify", str(tmp_path / "nope")], "does not exist")]:
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"tl-fast {argv[0]}: error:") and words in err and "\n" not in err, err


def test_fingerprint_command_binds_an_old_store_to_its_images(tmp_path, capsys):
    from tl_fast.cli import main
    from tl_fast.store import LabelStore

    train = make_folder(tmp_path / "train", {"a": 3, "b": 3}, seed=0)
    val = make_folder(tmp_path / "val", {"a": 3, "b": 3}, seed=1)
    plain = _quiet(make_store, train, tmp_path / "plain.tls", drop={"b/002"})
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, num_workers=0, device="cpu",
              missing_labels="one_hot")
    _quiet(TokenLabelLoader, val, plain, **kw)  # by path alone, the train store loads against val
    out = str(tmp_path / "fp.tls")
    assert main(["fingerprint", plain, train, "--out", out, "--quiet"]) == 0
    assert "5 of 5 records fingerprinted" in capsys.readouterr().out
    old, new = LabelStore.open(plain), LabelStore.open(out)
    assert new.keys == old.keys and new.has_fingerprint().all()
    assert new.metadata["fingerprints_from"] == os.path.abspath(train)
    assert torch.equal(new.read(range(5)).values, old.read(range(5)).values)
    assert torch.equal(new.read(range(5)).indices, old.read(range(5)).indices)
    _quiet(TokenLabelLoader, train, out, **kw)
    with pytest.raises(ValueError, match="are not the images"):
        _quiet(TokenLabelLoader, val, out, **kw)
    assert main(["fingerprint", plain, str(make_folder(tmp_path / "other", {"x": 2}, seed=3))]) == 1
    assert "tl-fast fingerprint: error: only 0 of 5 records" in capsys.readouterr().err


def test_without_libturbojpeg_pil_still_refuses_truncated_jpegs(tmp_path, monkeypatch):
    import tl_fast.imagecheck as imagecheck

    monkeypatch.setattr(imagecheck, "_TURBO", None)
    good = _noisy_jpeg()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (30, 20)).save(tmp_path / "cmyk.jpg")
    assert check_image(tmp_path / "good.jpg").problem == "" == check_image(tmp_path / "good.jpg", full=True).problem
    assert "truncated" in check_image(tmp_path / "cut.jpg").problem
    assert "CMYK" in check_image(tmp_path / "cmyk.jpg").problem


def test_every_format_the_index_accepts_decodes_alike_on_torch_and_dali(tmp_path):
    """BMP, WebP, RGBA/palette/grey PNGs and grey JPEGs pass the validity rule, so every backend
    must decode them (torchvision cannot decode BMP: the torch backend uses PIL for it)."""
    root = tmp_path / "imgs"
    os.makedirs(root / "a")
    rs = np.random.RandomState(0)
    base = Image.fromarray(rs.randint(0, 256, (4, 4, 3)).astype(np.uint8)).resize((40, 32), Image.Resampling.BICUBIC)
    base.save(root / "a" / "0.bmp")
    base.convert("P").save(root / "a" / "1_pal.bmp")
    base.save(root / "a" / "2.webp", lossless=True)
    base.convert("RGBA").save(root / "a" / "3_rgba.png")
    base.convert("P").save(root / "a" / "4_pal.png")
    base.convert("LA").save(root / "a" / "5_la.png")
    base.convert("L").save(root / "a" / "6_grey.jpg", quality=95)
    got = {}
    for backend in ("torch", "dali"):
        loader = TokenLabelLoader(str(root), None, backend=backend, batch_size=1, image_size=S, patch_size=P,
                                  num_workers=1, device="cpu", train=False, drop_last=False)
        assert loader.num_skipped == 0 and len(loader.index) == 7
        got[backend] = torch.cat([b.images for b in loader])
    per_image = (got["torch"] - got["dali"]).abs().flatten(1).mean(1)
    assert per_image.max() < 0.02, per_image  # normalized units: well under one uint8 level on average


# -- 5. one verdict per image for every reader (issue 27) -------------------------------------------

def _big_grey_jpeg(path, side: int) -> str:
    """A valid ``side`` x ``side`` grey JPEG (constant, so it stays small on disk)."""
    Image.new("L", (side, side), 128).save(path, quality=30)
    return str(path)


def test_pixel_limit_is_decided_from_the_header():
    from tl_fast.imagecheck import MAX_PIXELS, pixel_problem

    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # PIL's own default: PIL opens whatever the index accepts
    assert pixel_problem(9459, 9459) == ""  # 89,472,681 pixels
    assert "over the limit of 89,478,485" in pixel_problem(9500, 9500)


@pytest.fixture(scope="module")
def over_limit_jpeg(tmp_path_factory):
    """A valid grey JPEG just over the pixel limit (9500 x 9500 = 90,250,000 pixels)."""
    return _big_grey_jpeg(tmp_path_factory.mktemp("big") / "big.jpg", 9500)


@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_image_over_the_pixel_limit_is_skipped_alike_by_every_backend(tmp_path, over_limit_jpeg, backend):
    """libjpeg-turbo has no pixel limit, PIL has one: the index refuses what PIL (annotate, pack-ffcv)
    would, from the header alone, so every backend delivers the same samples, also with one-hot
    fall-backs for images without a record."""
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    os.link(over_limit_jpeg, os.path.join(root, "a", "big.jpg"))
    store = _quiet(make_store, root, tmp_path / "labels.tls", drop={"b/002"})
    images = root
    if backend == "ffcv":
        images = str(tmp_path / "x.beton")
        meta = _quiet(pack_ffcv, root, store, images, num_workers=1, progress=False, missing_labels="one_hot")
        assert meta["invalid"] == [] and meta["skipped_at_index"] == ["a/big.jpg"]
    loader = _quiet(TokenLabelLoader, images, store, backend=backend, batch_size=2, image_size=S, patch_size=P,
                    num_workers=1 if backend != "torch" else 0, device="cpu", augment=NO_RA, erase=None,
                    drop_last=False, missing_labels="one_hot")
    reasons = {s.path: s.reason for s in loader.skipped}
    assert loader.num_samples == 6 and loader.num_skipped == 1 and "pixels" in reasons["a/big.jpg"], reasons
    assert loader.num_missing_labels == 1 and sum(len(b) for b in loader) == 6


def test_annotate_and_pack_ffcv_decode_an_image_at_the_pixel_limit(tmp_path):
    """An image of just under MAX_PIXELS passes the index, and PIL (annotate, pack-ffcv) decodes it
    without a decompression-bomb warning or error; one over it was never handed to them."""
    from tl_fast.annotate import annotate
    from tl_fast.demo.annotator import DemoCNN
    from tl_fast.loaders.ffcv_pack import pack_ffcv
    from tl_fast.store import LabelStore

    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    _big_grey_jpeg(os.path.join(root, "a", "at_limit.jpg"), 9459)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        res = annotate(root, tmp_path / "k.tls", model=DemoCNN(num_classes=2, width=4).eval(), img_size=32, topk=2,
                       num_workers=0, progress=False)
        meta = pack_ffcv(root, str(tmp_path / "k.tls"), str(tmp_path / "x.beton"), num_workers=1, progress=False)
    assert res.skipped == [] and "a/at_limit" in LabelStore.open(tmp_path / "k.tls").keys
    assert meta["invalid"] == [] and meta["skipped"] == []


def test_image_files_no_reader_takes_are_counted_and_named(tmp_path):
    """torchvision's ImageFolder lists .tif, .ppm and .pgm files; no tl_fast reader takes them (nor
    .gif): each is a counted skip, named with the reason, not a silent omission."""
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    base = Image.new("RGB", (20, 16), (200, 30, 30))
    base.save(os.path.join(root, "a", "scan.tif"))
    base.save(os.path.join(root, "a", "anim.gif"))
    base.save(os.path.join(root, "b", "raw.PPM"))
    (tmp_path / "imgs" / "b" / "notes.txt").write_text("not an image")  # not an image name: not listed
    with pytest.warns(UserWarning, match="skipping 3 unusable"):
        index = ImageFolderIndex(root, progress=False)
    reasons = {s.path: s.reason for s in index.skipped}
    assert set(reasons) == {"a/scan.tif", "a/anim.gif", "b/raw.PPM"} and len(index) == 4
    assert "no reader takes .tif files" in reasons["a/scan.tif"] and ".ppm" in reasons["b/raw.PPM"]


def test_content_in_a_format_some_reader_cannot_decode_is_refused(tmp_path):
    """A GIF named .png decodes in torchvision and PIL but not in DALI; a TIFF named .png in DALI
    and PIL but not in torchvision: the content decides, and both are refused everywhere."""
    root = make_folder(tmp_path / "imgs", {"a": 2})
    Image.new("RGB", (20, 16), (200, 30, 30)).save(os.path.join(root, "a", "gif.png"), format="GIF")
    Image.new("RGB", (20, 16), (30, 200, 30)).save(os.path.join(root, "a", "tiff.png"), format="TIFF")
    index = _quiet(ImageFolderIndex, root, progress=False)
    reasons = {s.path: s.reason for s in index.skipped}
    assert "GIF data" in reasons["a/gif.png"] and "TIFF data" in reasons["a/tiff.png"] and len(index) == 2
    for backend in ("torch", "dali"):
        loader = _quiet(TokenLabelLoader, root, None, backend=backend, batch_size=1, image_size=S, patch_size=P,
                        num_workers=1, device="cpu", train=False, drop_last=False)
        assert loader.num_samples == 2 and sum(len(b) for b in loader) == 2


def test_file_name_that_cannot_be_a_store_key_is_refused_by_the_index(tmp_path):
    """A newline in a file name used to pass the index and abort annotate only after every image
    was annotated; it is refused (a counted skip, named) before anything is decoded."""
    from tl_fast.annotate import annotate
    from tl_fast.demo.annotator import DemoCNN
    from tl_fast.store import LabelStore

    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    with open(os.path.join(root, "a", "000.jpg"), "rb") as f:
        good = f.read()
    with open(os.path.join(root, "a", "two\nlines.jpg"), "wb") as f:
        f.write(good)
    index = _quiet(ImageFolderIndex, root, progress=False)
    reasons = {s.path: s.reason for s in index.skipped}
    assert len(index) == 4 and "newline" in reasons["a/two\nlines.jpg"]
    res = _quiet(annotate, root, tmp_path / "k.tls", model=DemoCNN(num_classes=2, width=4).eval(), img_size=32,
                 topk=2, num_workers=0, progress=False)
    assert res.skipped == ["a/two\nlines.jpg"] and len(LabelStore.open(tmp_path / "k.tls")) == 4


def test_exif_orientation_is_ignored_by_annotate_and_ffcv_too(tmp_path):
    """Annotate and the FFCV backend take the stored pixel grid, as torch and DALI do."""
    from tl_fast.annotate.images import ResizedImages
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = _exif_rotated_folder(tmp_path / "imgs")
    seen, _, ok = ResizedImages(root, ["a/0.jpg"], 16, "bilinear")[0]
    assert ok and seen[0, :, :6].float().mean() > 200 and seen[1, :, -6:].float().mean() > 200
    beton = str(tmp_path / "x.beton")
    _quiet(pack_ffcv, str(root), None, beton, num_workers=1, progress=False)
    got = {}
    for backend, images in (("torch", str(root)), ("ffcv", beton)):
        loader = TokenLabelLoader(images, None, backend=backend, batch_size=1, image_size=S, patch_size=P,
                                  num_workers=1 if backend == "ffcv" else 0, device="cpu", train=False, drop_last=False)
        got[backend] = next(iter(loader)).images
    assert (got["torch"] - got["ffcv"]).abs().mean() < 0.1
