"""Label store: format, codec round trips, atomic writer, corruption handling, convert-pt / inspect."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.synthetic import synthetic_topk_maps
from tl_fast.store import LabelStore, StoreError, StoreWriter, TopKMaps, decode_records, encode_record
from tl_fast.store.codec import _checksum, float16_keys
from tl_fast.store.format import HEADER_SIZE

K, TOPK, HW = 1000, 5, (18, 18)


@pytest.fixture(scope="module")
def maps():
    v, i = synthetic_topk_maps(12, num_classes=K, topk=TOPK, map_size=HW, kind="smooth", seed=1)
    return v, i


def write_store(path, values, indices, *, keys=None, lossy=False, num_classes=K):
    keys = keys or [f"class{i % 3}/img_{i:04d}" for i in range(len(values))]
    with StoreWriter(path, num_classes=num_classes, topk=values.shape[1], map_size=values.shape[2:],
                     lossy=lossy) as w:
        for key, v, i in zip(keys, values, indices):
            w.add(key, v, i)
    return keys


def bits16(x) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(x, dtype=np.float16).view(np.uint16)


# ------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_bit_exact_and_lookup(tmp_path, maps):
    v, i = maps
    path = tmp_path / "s.tls"
    keys = write_store(path, v, i)
    s = LabelStore.open(path)
    assert len(s) == len(v) and s.num_classes == K and s.topk == TOPK and s.map_size == HW and not s.lossy
    assert s.keys == keys
    ids = [5, 0, 11, 5]
    out = s.read(ids)
    assert isinstance(out, TopKMaps)
    assert out.values.dtype == torch.float16 and out.indices.dtype == torch.int16
    assert tuple(out.values.shape) == (4, TOPK, *HW)
    np.testing.assert_array_equal(bits16(out.values), bits16(v[ids]))
    np.testing.assert_array_equal(out.indices.numpy(), i[ids])
    assert s.index_of(keys[7]) == 7
    np.testing.assert_array_equal(s.lookup([keys[3], keys[1]]), [3, 1])
    with pytest.raises(KeyError, match="class9/nope"):
        s.index_of("class9/nope")
    with pytest.raises(KeyError, match="missing/key"):
        s.lookup([keys[0], "missing/key"])
    with pytest.raises(IndexError):
        s.read([len(v)])
    # tensors in, tuple-like out, .to()
    vals, idx = s.read(torch.tensor([2, 3])).to("cpu")
    np.testing.assert_array_equal(idx.numpy(), i[2:4])
    # reading into preallocated (pinned-style) outputs
    buf = TopKMaps(torch.empty(2, TOPK, *HW, dtype=torch.float16), torch.empty(2, TOPK, *HW, dtype=torch.int16))
    assert s.read([1, 2], out=buf) is buf
    np.testing.assert_array_equal(bits16(buf.values), bits16(v[1:3]))
    s.close()


def test_size_target_on_smooth_maps(tmp_path, maps):
    """Lossless records of annotator-like maps must be <= 60% of the public .pt file (8,013 B)."""
    v, i = maps
    sizes = [encode_record(v[n], i[n])[0].nbytes for n in range(len(v))]
    assert np.median(sizes) <= 0.6 * 8013


def test_public_pt_bytes_is_the_size_of_a_public_file(tmp_path):
    """``tl-fast inspect`` sets a store against the public layout by ``public_pt_bytes``: a file written the
    public way is that size (its zip archive is named after the file, so a few bytes more)."""
    from tl_fast.store.commands import public_pt_bytes

    for k, hw in ((2, (4, 4)), (5, (18, 18))):
        path = tmp_path / "n01440764" / f"n01440764_{k}.pt"
        path.parent.mkdir(exist_ok=True)
        torch.save(torch.zeros(2, k, *hw, dtype=torch.float16), path)
        assert public_pt_bytes(k, hw) <= path.stat().st_size <= public_pt_bytes(k, hw) + 256


def test_record_bytes_and_decode_records(tmp_path, maps):
    v, i = maps
    path = tmp_path / "s.tls"
    write_store(path, v, i)
    s = LabelStore.open(path)
    recs = [s.record_bytes(n) for n in range(len(s))]
    assert all(r.dtype == np.uint8 and r.nbytes % 8 == 0 for r in recs)
    out = decode_records(recs, K, TOPK, HW)
    np.testing.assert_array_equal(bits16(out.values), bits16(v))
    np.testing.assert_array_equal(out.indices.numpy(), i)
    # a padded 2-D array with lengths, with an odd row width (forces the aligned copy)
    width = max(r.nbytes for r in recs) + 3
    padded = np.zeros((len(recs), width), np.uint8)
    for n, r in enumerate(recs):
        padded[n, : r.nbytes] = r
    out2 = decode_records(padded, K, TOPK, HW, lengths=[r.nbytes for r in recs])
    np.testing.assert_array_equal(out2.indices.numpy(), i)
    raw, lens = s.raw_records([3, 0, 3])
    assert raw.shape[1] % 8 == 0 and list(lens) == [recs[3].nbytes, recs[0].nbytes, recs[3].nbytes]
    np.testing.assert_array_equal(raw[1, : lens[1]], recs[0])
    np.testing.assert_array_equal(decode_records(raw, K, TOPK, HW, lengths=lens).indices.numpy(), i[[3, 0, 3]])
    out3 = decode_records([bytes(r) for r in recs[:2]], K, TOPK, HW)
    np.testing.assert_array_equal(bits16(out3.values), bits16(v[:2]))
    with pytest.raises(ValueError, match="lengths"):
        decode_records(padded, K, TOPK, HW)
    # records are checked against the shape the caller expects
    with pytest.raises(StoreError, match="malformed"):
        decode_records(recs[:1], K, TOPK - 1, HW)


def test_torch_and_float32_inputs_int32_ids(tmp_path):
    rng = np.random.default_rng(3)
    big_k = 70000  # > 32767 -> int32 ids; > 65535 -> 4-byte palette entries
    v = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    i = rng.integers(0, big_k, (2, 3, 4, 5))
    path = tmp_path / "big.tls"
    with StoreWriter(path, num_classes=big_k, topk=3, map_size=(4, 5)) as w:
        w.add("a", torch.from_numpy(v[0]), torch.from_numpy(i[0]))
        w.add("b", v[1], i[1].astype(np.int32))
    s = LabelStore.open(path)
    out = s.read([0, 1])
    assert out.indices.dtype == torch.int32
    np.testing.assert_array_equal(out.indices.numpy(), i)
    np.testing.assert_array_equal(bits16(out.values), bits16(v.astype(np.float16)))


def test_pickle_reopens_by_path(tmp_path, maps):
    v, i = maps
    path = tmp_path / "s.tls"
    write_store(path, v[:3], i[:3])
    s = LabelStore.open(path)
    blob = pickle.dumps(s)
    assert len(blob) < 1000  # not the mapped bytes
    s2 = pickle.loads(blob)
    np.testing.assert_array_equal(s2.read([2]).indices.numpy(), i[2:3])


def test_empty_store(tmp_path):
    path = tmp_path / "e.tls"
    with StoreWriter(path, num_classes=10, topk=2, map_size=(3, 3)):
        pass
    s = LabelStore.open(path)
    assert len(s) == 0 and s.keys == []
    assert tuple(s.read([]).values.shape) == (0, 2, 3, 3)


# ------------------------------------------------------------------------------------------------
# property tests of the codec


def _finite_f16(rng, shape, allow_neg):
    bits = rng.integers(0, 0x7C00, size=shape, dtype=np.uint16)  # finite non-negative float16
    if allow_neg:
        bits |= (rng.random(shape) < 0.5).astype(np.uint16) << 15
    return bits.view(np.float16)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 9),
       num_classes=st.sampled_from([1, 2, 3, 7, 100, 1000, 32767, 32768, 65537, 100003]),
       seed=st.integers(0, 2**31 - 1), smooth=st.booleans(), neg=st.booleans())
def test_codec_round_trip_property(k, h, w, num_classes, seed, smooth, neg):
    rng = np.random.default_rng(seed)
    n = 3
    if smooth:  # few distinct ids and narrow value ranges
        ids = rng.integers(0, num_classes, (n, 1, 1, 1)) + rng.integers(0, 2, (n, k, h, w))
        ids = np.minimum(ids, num_classes - 1)
        vals = (rng.random((n, k, h, w)) * 0.01 + 0.5).astype(np.float16)
        if neg:
            vals = -vals
    else:
        ids = rng.integers(0, num_classes, (n, k, h, w))
        vals = _finite_f16(rng, (n, k, h, w), neg)
    vals.reshape(-1)[0] = np.float16(-0.0) if neg else np.float16(0.0)
    recs = [encode_record(vals[j], ids[j])[0] for j in range(n)]
    out = decode_records(recs, num_classes, k, (h, w))
    assert out.indices.dtype == (torch.int16 if num_classes <= 32767 else torch.int32)
    np.testing.assert_array_equal(out.values.numpy().view(np.uint16), vals.view(np.uint16))
    np.testing.assert_array_equal(out.indices.numpy(), ids)
    # lossy: bounded error in float16 order-key units, always finite and inside the slot's range
    lossy = decode_records([encode_record(vals[j], ids[j], lossy=True)[0] for j in range(n)], num_classes, k, (h, w))
    np.testing.assert_array_equal(lossy.indices.numpy(), ids)
    check_lossy_bound(vals, lossy.values.numpy())


def check_lossy_bound(orig: np.ndarray, dec: np.ndarray) -> None:
    """The bound stated in tl_fast.store.format: keys within ceil((step-1)/2) of the original, decoded
    values inside the slot's range, and (same-sign normal values) relative error <= that * 2**-10."""
    ko = float16_keys(orig.view(np.uint16))
    kd = float16_keys(dec.view(np.uint16))
    o32, d32 = orig.astype(np.float64), dec.astype(np.float64)
    n, k = orig.shape[:2]
    for b in range(n):
        for j in range(k):
            lo, hi = ko[b, j].min(), ko[b, j].max()
            step = max(1, -(-(hi - lo + 1) // 256))
            bound = step // 2  # == ceil((step - 1) / 2)
            assert np.abs(kd[b, j] - ko[b, j]).max() <= bound
            assert kd[b, j].min() >= lo and kd[b, j].max() <= hi
            mag = np.maximum(np.abs(o32[b, j]), np.abs(d32[b, j]))
            ok = np.minimum(np.abs(o32[b, j]), np.abs(d32[b, j])) >= 2.0**-14
            ok &= np.sign(o32[b, j]) == np.sign(d32[b, j])
            assert np.all(np.abs(d32[b, j] - o32[b, j])[ok] <= bound * 2.0**-10 * mag[ok])
    assert np.all(np.isfinite(dec))


def test_lossy_store_bound_and_size(tmp_path, maps):
    v, i = maps
    path = tmp_path / "l.tls"
    write_store(path, v, i, lossy=True)
    s = LabelStore.open(path)
    assert s.lossy
    out = s.read(np.arange(len(v)))
    np.testing.assert_array_equal(out.indices.numpy(), i)
    check_lossy_bound(v, out.values.numpy())
    assert not np.array_equal(bits16(out.values), bits16(v))  # it is lossy
    assert s.record_lengths.mean() < 0.45 * 8013


# ------------------------------------------------------------------------------------------------
# writer: atomicity and input validation


def test_exception_inside_with_leaves_nothing(tmp_path, maps):
    v, i = maps
    path = tmp_path / "s.tls"
    with pytest.raises(RuntimeError):
        with StoreWriter(path, num_classes=K, topk=TOPK, map_size=HW) as w:
            w.add("a", v[0], i[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    # an existing store survives a failed rewrite
    write_store(path, v[:2], i[:2])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with StoreWriter(path, num_classes=K, topk=TOPK, map_size=HW) as w:
            w.add("x", v[3], i[3])
            raise RuntimeError("boom")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.tls"]


def test_interrupted_temp_file_never_opens(tmp_path, maps):
    v, i = maps
    w = StoreWriter(tmp_path / "s.tls", num_classes=K, topk=TOPK, map_size=HW)
    for n in range(3):
        w.add(f"k{n}", v[n], i[n])
    w._file.flush()  # what a killed process leaves behind: the temp file with a zero header
    tmp = w._tmp
    assert os.path.getsize(tmp) > HEADER_SIZE and not (tmp_path / "s.tls").exists()
    with pytest.raises(StoreError, match="bad magic"):
        LabelStore.open(tmp)
    w.abort()
    assert not os.path.exists(tmp)


@pytest.mark.parametrize("case, match", [
    ("nan", "non-finite"), ("inf", "non-finite"), ("overflow", "overflows float16"),
    ("id_high", "class id 1000 outside"), ("id_neg", "class id -1 outside"),
    ("shape", r"must both be \[k, H, W\]"), ("float_ids", "indices must be integers"),
    ("dup", "duplicate record key 'img/dup'"), ("newline", "newline"),
])
def test_writer_rejects_bad_input_naming_key(tmp_path, maps, case, match):
    v, i = maps
    vals, ids = v[1].copy(), i[1].copy()
    if case == "nan":
        vals[2, 3, 4] = np.nan
    elif case == "inf":
        vals[0, 0, 0] = np.inf
    elif case == "overflow":
        vals = vals.astype(np.float32)
        vals[1, 1, 1] = 1e6
    elif case == "id_high":
        ids[4, 17, 17] = K
    elif case == "id_neg":
        ids[0, 0, 0] = -1
    elif case == "shape":
        vals = vals[:, :, :17]
    elif case == "float_ids":
        ids = ids.astype(np.float16)
    key = "img/dup" if case == "dup" else ("bad\nkey" if case == "newline" else "img/bad_one")
    path = tmp_path / "s.tls"
    with StoreWriter(path, num_classes=K, topk=TOPK, map_size=HW) as w:
        w.add("img/dup", v[0], i[0])
        with pytest.raises(StoreError, match=match) as err:
            w.add(key, vals, ids)
        if case not in ("dup", "newline"):
            assert "img/bad_one" in str(err.value)
    s = LabelStore.open(path)  # the rejected record left no trace
    assert s.keys == ["img/dup"]
    np.testing.assert_array_equal(s.read([0]).indices.numpy(), i[:1])


# ------------------------------------------------------------------------------------------------
# corruption


@pytest.fixture()
def store_file(tmp_path, maps):
    v, i = maps
    path = tmp_path / "c.tls"
    keys = write_store(path, v[:4], i[:4])
    return path, keys


def _flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_flipped_record_byte_names_file_and_record(store_file):
    path, keys = store_file
    s = LabelStore.open(path)
    off, ln = int(s._offsets[2]), int(s._lengths[2])
    s.close()
    _flip(path, off + ln // 2)
    s = LabelStore.open(path)  # header/index are fine
    s.read([0, 1, 3])  # other records still read
    with pytest.raises(StoreError, match="checksum mismatch") as err:
        s.read([1, 2])
    assert str(path) in str(err.value) and "record 2" in str(err.value) and keys[2] in str(err.value)
    with pytest.raises(StoreError, match=str(path)):
        s.verify()


@pytest.mark.parametrize("where", ["index", "manifest", "header_field"])
def test_flipped_metadata_byte_fails_at_open(store_file, where):
    path, _ = store_file
    s = LabelStore.open(path)
    off = {"index": s.header["index_offset"] + 3, "manifest": s.header["manifest_offset"] + 2,
           "header_field": 16}[where]  # 16 = num_classes
    s.close()
    _flip(path, off)
    with pytest.raises(StoreError, match="checksum mismatch") as err:
        LabelStore.open(path)
    assert str(path) in str(err.value)


def test_truncated_and_foreign_files(store_file, tmp_path):
    path, _ = store_file
    raw = path.read_bytes()
    path.write_bytes(raw[:-8])
    with pytest.raises(StoreError, match="truncated"):
        LabelStore.open(path)
    path.write_bytes(raw[:100])
    with pytest.raises(StoreError, match="too small"):
        LabelStore.open(path)
    bad_version = bytearray(raw)
    bad_version[8] = 99
    path.write_bytes(bytes(bad_version))
    with pytest.raises(StoreError, match="version 99"):
        LabelStore.open(path)
    other = tmp_path / "other.bin"
    other.write_bytes(b"PK\x03\x04" + bytes(300))
    with pytest.raises(StoreError, match="bad magic"):
        LabelStore.open(other)


def _reseal(rec: np.ndarray) -> np.ndarray:
    """Recompute a hand-edited record's checksum, to exercise the decoder's bound checks."""
    words = rec.copy().view(np.uint64)
    words[0] &= np.uint64(0xFFFFFFFF)
    words[0] |= np.uint64(_checksum(words, 0, words.shape[0])) << np.uint64(32)
    return words.view(np.uint8)


def test_decoder_bound_checks_even_with_valid_checksum():
    rng = np.random.default_rng(0)
    vals = rng.random((2, 3, 3)).astype(np.float16)
    ids = np.array([10, 20, 30])[rng.integers(0, 3, (2, 3, 3))]
    rec, _ = encode_record(vals, ids)
    assert decode_records([rec], 31, 2, (3, 3)).indices.max() <= 30
    with pytest.raises(StoreError, match="palette class id out of range"):
        decode_records([rec], 30, 2, (3, 3))  # a store claiming K=30 cannot yield id 30
    # a packed index pointing past the 3-entry palette (b=2 allows 3)
    words = rec.copy().view(np.uint64)
    words[2 + 2 + 1] |= np.uint64(0b11)  # first id word, after header(2) + slot params(2) + palette(1)
    with pytest.raises(StoreError, match="outside the record's palette"):
        decode_records([_reseal(words.view(np.uint8))], 31, 2, (3, 3))
    # a lying palette size
    words = rec.copy().view(np.uint64)
    words[1] = (words[1] & ~np.uint64(0xFFFFFFFF)) | np.uint64(1000)
    with pytest.raises(StoreError, match="malformed"):
        decode_records([_reseal(words.view(np.uint8))], 31, 2, (3, 3))
    # a value range reaching into inf/NaN keys
    words = rec.copy().view(np.uint64)
    words[2] |= np.uint64(0xFFFF) << np.uint64(16)
    with pytest.raises(StoreError, match="malformed"):
        decode_records([_reseal(words.view(np.uint8))], 31, 2, (3, 3))
    # truncated record
    with pytest.raises(StoreError):
        decode_records([rec[:-8]], 31, 2, (3, 3))


# ------------------------------------------------------------------------------------------------
# commands


def _write_public(root, n=6, k=3, hw=(5, 4), num_classes=40):
    v, i = synthetic_topk_maps(n, num_classes=num_classes, topk=k, map_size=hw, kind="smooth", seed=4)
    keys = []
    for j in range(n):
        cls = f"n0{j % 2}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([torch.from_numpy(v[j]), torch.from_numpy(i[j]).half()]), root / cls / f"im{j}.pt")
        keys.append(f"{cls}/im{j}")
    return v, i, keys


def test_convert_pt_and_inspect_end_to_end(tmp_path, capsys):
    from tl_fast.cli import main

    src = tmp_path / "pub"
    v, i, keys = _write_public(src)
    dst = tmp_path / "out" / "labels.tls"
    assert main(["convert-pt", str(src), str(dst), "--num-classes", "40", "--quiet"]) == 0
    s = LabelStore.open(dst)
    assert s.num_classes == 40 and s.topk == 3 and s.map_size == (5, 4) and len(s) == 6
    ids = s.lookup(keys)
    out = s.read(ids)
    np.testing.assert_array_equal(bits16(out.values), bits16(v))
    np.testing.assert_array_equal(out.indices.numpy(), i)
    assert s.metadata["source_files"] == 6
    capsys.readouterr()
    assert main(["inspect", str(dst), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "records     6" in text and "all 6 records OK" in text and "K=40" in text
    # lossy, with K inferred, files loaded by worker processes
    dst2 = tmp_path / "lossy.tls"
    assert main(["convert-pt", str(src), str(dst2), "--lossy", "--quiet", "--workers", "2"]) == 0
    s2 = LabelStore.open(dst2)
    assert s2.lossy and s2.num_classes == int(i.max()) + 1 and s2.keys == s.keys
    np.testing.assert_array_equal(s2.read(s2.lookup(keys)).indices.numpy(), i)
    # a corrupted store fails inspect with the file named
    _flip(dst, int(s._offsets[1]) + 20)
    assert main(["inspect", str(dst), "--verify"]) == 1
    assert str(dst) in capsys.readouterr().err


@pytest.mark.parametrize("bad, workers", [("shape", "0"), ("unreadable", "0"), ("fractional_ids", "0"),
                                         ("id_range", "0"), ("not_tensor", "0"), ("unreadable", "2")])
def test_convert_pt_names_bad_file(tmp_path, capsys, bad, workers):
    from tl_fast.cli import main

    src = tmp_path / "pub"
    _write_public(src)
    target = src / "n01" / "zz_bad.pt"
    if bad == "shape":
        torch.save(torch.zeros(2, 3, 5, 5, dtype=torch.float16), target)
    elif bad == "unreadable":
        target.write_bytes(b"this is not a pickle")
    elif bad == "fractional_ids":
        t = torch.zeros(2, 3, 5, 4, dtype=torch.float16)
        t[1, 0, 0, 0] = 2.5
        torch.save(t, target)
    elif bad == "id_range":
        t = torch.zeros(2, 3, 5, 4, dtype=torch.float16)
        t[1, 0, 0, 0] = 40
        torch.save(t, target)
    elif bad == "not_tensor":
        torch.save({"a": 1}, target)
    dst = tmp_path / "x.tls"
    assert main(["convert-pt", str(src), str(dst), "--num-classes", "40", "--quiet", "--workers", workers]) == 1
    err = capsys.readouterr().err
    assert "zz_bad.pt" in err
    assert not dst.exists() and os.listdir(tmp_path) == ["pub"]


def test_benchmark_runs_small(capsys, tmp_path):
    """benchmarks.store_throughput end to end on a tiny configuration (figures, not timings), and its rows."""
    from benchmarks import harness, store_throughput

    r = store_throughput.main(["--n", "32", "--batch", "8", "--repeats", "1", "--public-n", "16", "--size-n", "2",
                               "--num-classes", "50", "--topk", "3", "--map-size", "6", "5",
                               "--results-dir", str(tmp_path)])
    assert r["gather_maps_s"]["median"] > 0 and r["public_maps_s"]["median"] > 0
    assert set(r["bytes"]) == {"smooth", "field", "random"}
    assert r["bytes"]["smooth"]["lossy"] < r["bytes"]["smooth"]["lossless"] < r["public_pt_bytes"]
    assert "LabelStore.read (lossless)" in capsys.readouterr().out
    rows = {row["what"]: row for row in harness.read_rows(tmp_path / "store_throughput.json")}
    gather = rows["batched gather: LabelStore.read, lossless"]
    assert gather["value"] == pytest.approx(r["gather_maps_s"]["median"], rel=1e-5)
    assert gather["baseline"]["value"] == pytest.approx(r["public_maps_s"]["median"], rel=1e-5)
    smooth = rows["bytes per record, lossless, annotator-like maps"]
    assert smooth["ratio"] == pytest.approx(r["bytes"]["smooth"]["lossless"] / r["public_pt_bytes"], rel=1e-5)
    assert smooth["meets"] is True and smooth["command"].startswith("python -m benchmarks.store_throughput --n 32")
