"""ImageNet-scale host paths (issue 19): chunked index checks with an early progress bar, convert-pt's
default worker count, the label store's mapping advice, and benchmarks.scale_check end to end."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from benchmarks.synthetic import synthetic_topk_maps
from test_loader_helpers import make_folder
from tl_fast import dataset
from tl_fast.imagecheck import check_image
from tl_fast.store import LabelStore, StoreWriter
from tl_fast.store import commands, reader


# -- indexing ----------------------------------------------------------------------------------------

def test_chunk_size_bounds():
    assert dataset._chunk_size(0, 8) == 1
    assert dataset._chunk_size(10, 8) == 1
    assert dataset._chunk_size(100_000, 8) == 256  # capped
    assert dataset._chunk_size(4_000, 2) == 250  # every thread gets several chunks


def test_check_all_keeps_order_in_chunks_and_shows_the_bar_first(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"a": 7, "b": 6})
    (tmp_path / "imgs" / "b" / "zz_bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.jpg"))
    events: list[str] = []

    class Bar:
        def __init__(self, *a, total=0, disable=False, **k):
            events.append("bar")
            self.n = 0

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(f"closed {self.n}")

    real_check = dataset.check_image

    def check(path, *, full):
        events.append("check")
        return real_check(path, full=full)

    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(dataset, "check_image", check)
    monkeypatch.setattr(dataset, "_chunk_size", lambda n, threads: 3)  # several chunks, one short
    got = dataset._check_all(paths, False, 3, "test", True)
    assert got == [check_image(p) for p in paths]
    assert got[-1].problem and not any(c.problem for c in got[:-1])
    assert events[0] == "bar" and events[-1] == f"closed {len(paths)}" and events.count("check") == len(paths)
    assert root


def test_index_matches_across_thread_counts(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 5, "b": 5})
    one = dataset.ImageFolderIndex(root, num_threads=1, cache_dir=tmp_path / "c1", progress=False)
    os.remove(os.path.join(root, dataset.CACHE_NAME))
    many = dataset.ImageFolderIndex(root, num_threads=4, cache_dir=tmp_path / "c2", progress=False)
    assert one.paths == many.paths
    np.testing.assert_array_equal(one.sizes, many.sizes)
    np.testing.assert_array_equal(one.fingerprints, many.fingerprints)


# -- convert-pt ----------------------------------------------------------------------------------------

def test_convert_pt_defaults_to_the_available_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert commands.available_cores() == 3
    assert commands.default_workers(commands.POOL_MIN_FILES) == 3
    assert commands.default_workers(commands.POOL_MIN_FILES - 1) == 0  # a pool costs more than it saves
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert commands.default_workers(10**6) == 0
    from tl_fast.cli import build_parser

    args = build_parser().parse_args(["convert-pt", "src", "dst"])
    assert args.workers is None


def test_convert_pt_default_pool_writes_the_same_store(tmp_path, monkeypatch):
    v, i = synthetic_topk_maps(6, num_classes=40, topk=3, map_size=(5, 4), kind="smooth", seed=4)
    src = tmp_path / "pub"
    for j in range(6):
        (src / f"n0{j % 2}").mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([torch.from_numpy(v[j]), torch.from_numpy(i[j]).half()]), src / f"n0{j % 2}" / f"{j}.pt")
    monkeypatch.setattr(commands, "POOL_MIN_FILES", 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    pooled = commands.convert_pt(src, tmp_path / "a.tls", num_classes=40, progress=False)
    inproc = commands.convert_pt(src, tmp_path / "b.tls", num_classes=40, progress=False, workers=0)
    assert pooled.keys == inproc.keys
    a, b = pooled.read(np.arange(6)), inproc.read(np.arange(6))
    assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)


# -- the store's mapping -------------------------------------------------------------------------------

@pytest.fixture()
def store_path(tmp_path):
    v, i = synthetic_topk_maps(64, num_classes=100, topk=3, map_size=(18, 18), kind="random", seed=2)
    path = tmp_path / "s.tls"
    with StoreWriter(path, num_classes=100, topk=3, map_size=(18, 18)) as w:
        for j in range(64):
            w.add(f"c/{j}", v[j], i[j])
    return str(path)


def _vm_flags(path: str) -> list[set[str]]:
    """VmFlags of this process's mappings of ``path`` (Linux)."""
    flags, inside = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("VmFlags:"):
                flags.append(set(head[1:]))
    return flags


@pytest.mark.parametrize("access", reader.ACCESS_MODES)
def test_every_access_reads_the_same_records(store_path, access):
    ids = np.array([5, 63, 0, 17, 17])
    with LabelStore.open(store_path) as plain, LabelStore.open(store_path, access=access) as s:
        a, b = plain.read(ids), s.read(ids)
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
        s.verify()
        assert torch.equal(s.read(ids).values, a.values)
        again = pickle.loads(pickle.dumps(s))
        assert again.access == access and torch.equal(again.read(ids).indices, a.indices)
        again.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_random_access_marks_only_the_record_section(store_path):
    with LabelStore.open(store_path, access="random") as s:
        flags = _vm_flags(os.path.realpath(store_path))
        # the record section is split off as its own mapping, read without read-ahead ("rr")
        assert any("rr" in f for f in flags) and any("rr" not in f for f in flags), flags
        assert s.advise("normal") == "normal"
        assert not any("rr" in f for f in _vm_flags(os.path.realpath(store_path)))


def test_auto_access_follows_the_memory_available(store_path, monkeypatch):
    monkeypatch.setattr(reader, "available_memory", lambda: 10**12)
    assert reader.resolve_access("auto", 10**9) == "populate"
    monkeypatch.setattr(reader, "available_memory", lambda: 10**9)
    assert reader.resolve_access("auto", 10**9) == "random"
    monkeypatch.setattr(reader, "available_memory", lambda: 1000)  # smaller than this store's records
    with LabelStore.open(store_path, access="auto") as s:
        assert s._advice == "random" and s.access == "auto"
    with pytest.raises(ValueError, match="access must be one of"):
        LabelStore.open(store_path, access="sideways")


def test_cgroup_limits_cap_the_memory_available(tmp_path):
    proc = tmp_path / "cgroup"
    (tmp_path / "memory" / "job").mkdir(parents=True)
    (tmp_path / "memory" / "job" / "memory.limit_in_bytes").write_text("1000\n")
    (tmp_path / "memory" / "job" / "memory.usage_in_bytes").write_text("400\n")
    proc.write_text("4:memory:/job\n0::/\n")
    assert reader._cgroup_headroom(str(proc), str(tmp_path)) == 600  # v1
    (tmp_path / "memory" / "job" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    assert reader._cgroup_headroom(str(proc), str(tmp_path)) is None  # v1 "no limit"
    (tmp_path / "ctr").mkdir()
    (tmp_path / "ctr" / "memory.max").write_text("5000\n")
    (tmp_path / "ctr" / "memory.current").write_text("1000\n")
    proc.write_text("0::/ctr\n")
    assert reader._cgroup_headroom(str(proc), str(tmp_path)) == 4000  # v2
    (tmp_path / "ctr" / "memory.max").write_text("max\n")
    assert reader._cgroup_headroom(str(proc), str(tmp_path)) is None
    assert reader._cgroup_headroom(str(tmp_path / "absent"), str(tmp_path)) is None


def test_loader_opens_its_store_for_scattered_reads(tmp_path):
    from test_loader_helpers import make_store
    from tl_fast.loaders import TokenLabelLoader

    root = make_folder(tmp_path / "imgs")
    store = make_store(root, tmp_path / "l.tls")
    loader = TokenLabelLoader(root, store, backend="torch", batch_size=4, image_size=32, num_workers=0, device="cpu")
    assert loader.source.store_maps.store.access == "auto"


# -- the benchmark -------------------------------------------------------------------------------------

def test_scale_check_runs_small(tmp_path, capsys):
    from benchmarks import harness, scale_check

    scale_check.main(["--workdir", str(tmp_path / "w"), "--images", "40", "--pt-files", "8", "--records", "300",
                      "--small-records", "100", "--gather-batches", "2", "--cold-batches", "1", "--gather-rounds", "1",
                      "--json", str(tmp_path / "r.json"), "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert "index: 40 images" in out and "convert-pt:" in out and "cold random" in out and "verify:" in out
    rows = harness.read_rows(tmp_path / "results" / "scale_check.json")
    assert {r["target"] for r in rows} == {"imagenet-scale", "label-store"}
    gathers = [r for r in rows if r["target"] == "label-store"]
    assert len(gathers) == 2 * 2 * len(scale_check.ACCESSES)  # two stores, warm and cold, each mapping
    assert sum("goal" in r for r in gathers) == 2  # the warm gather of the mapping 'auto' picks, per store
