"""TokenLabelLoader: the three backends agree, follow the plan, resume, shard, and fail clearly.

Image tolerance between backends (uint8 levels, same JPEG bytes, same plan): DALI vs torch differ
by the decoders' IDCT and the resize kernels — mean |diff| <= 1, max <= 4; FFCV resizes with
OpenCV's INTER_AREA instead of antialiased bilinear — mean |diff| <= 3, max <= 24.
Label inputs (indices, class ids, affines, maps, MixToken boxes) must be identical.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from test_loader_helpers import coordinate_image, exploding_ffcv_op, make_folder, make_store
from tl_fast import geometry
from tl_fast.augment import IMAGENET_MEAN, IMAGENET_STD, augment_batch
from tl_fast.dataset import ImageFolderIndex, join_labels
from tl_fast.loaders import TokenLabelLoader
from tl_fast.loaders.common import EpochPlans
from tl_fast.plan import RA_GEOMETRIC, RA_OPS, AugmentConfig
from tl_fast.store import LabelStore

BACKENDS = ("torch", "dali", "ffcv")
NO_RA = AugmentConfig(randaugment=None)
S, P = 32, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = tmp_path_factory.mktemp("loader")
    images = make_folder(root / "images")
    store = make_store(images, root / "labels.tls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_ffcv(images, store, str(root / "train.beton"), num_workers=1, progress=False)
    return {"images": images, "store": store, "beton": str(root / "train.beton"), "root": root}


def _loader(data, backend, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", S)
    kw.setdefault("patch_size", P)
    kw.setdefault("num_workers", 1 if backend != "torch" else 0)
    kw.setdefault("device", "cpu")
    if backend == "ffcv":
        return TokenLabelLoader(data["beton"], kw.pop("labels", None), backend="ffcv", **kw)
    return TokenLabelLoader(data["images"], kw.pop("labels", data["store"]), backend=backend, **kw)


def _levels(images: torch.Tensor) -> torch.Tensor:
    """Normalized images back to uint8 levels."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean) * 255


def _epoch(loader):
    return [(b.indices.copy(), b.images.clone(), b.labels.clone(), b.affine.clone(),
             None if b.maps is None else (b.maps.values.clone(), b.maps.indices.clone()),
             None if b.mix_box is None else b.mix_box.clone()) for b in loader]


# -- index and join --------------------------------------------------------------------------------

def test_index_sizes_classes_and_cache(tmp_path):
    root = make_folder(tmp_path / "imgs", {"b": 2, "a": 3})
    index = ImageFolderIndex(root, progress=False)
    assert index.classes == ["a", "b"]
    assert index.paths[0] == "a/000.jpg" and list(index.targets) == [0, 0, 0, 1, 1]
    for i, p in enumerate(index.paths):
        with Image.open(os.path.join(root, p)) as im:
            assert tuple(index.sizes[i]) == (im.size[1], im.size[0])
    assert os.path.isfile(os.path.join(root, ".tl_fast_index.npz"))
    assert index.keys[0] == "a/000"
    # A new file changes the file list: the cache is rebuilt, not trusted.
    Image.new("RGB", (17, 23)).save(os.path.join(root, "b", "new.jpg"))
    again = ImageFolderIndex(root, progress=False)
    assert len(again) == 6 and tuple(again.sizes[again.paths.index("b/new.jpg")]) == (23, 17)


def test_corrupt_and_truncated_jpegs_are_counted_skips(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    with open(os.path.join(root, "a", "garbage.jpg"), "wb") as f:
        f.write(os.urandom(500))
    good = open(os.path.join(root, "b", "000.jpg"), "rb").read()
    with open(os.path.join(root, "b", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="skipping 2 unusable"):
        index = ImageFolderIndex(root, progress=False)
    assert len(index) == 6 and sorted(s.path for s in index.skipped) == ["a/garbage.jpg", "b/truncated.jpg"]
    assert any("truncated" in s.reason for s in index.skipped)
    with pytest.raises(ValueError, match="truncated.jpg"):
        ImageFolderIndex(root, bad_images="error", progress=False)
    with pytest.warns(UserWarning):
        loader = TokenLabelLoader(root, None, backend="torch", batch_size=3, image_size=S, patch_size=P,
                                  num_workers=0, device="cpu")
    assert loader.num_skipped == 2
    assert sum(len(b) for b in loader) == 6


def test_empty_class_folder_is_an_error(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    os.makedirs(os.path.join(root, "c_empty"))
    with pytest.raises(ValueError, match="c_empty"):
        ImageFolderIndex(root, progress=False)
    index = ImageFolderIndex(root, allow_empty_classes=True, progress=False)
    assert index.classes == ["a", "b", "c_empty"] and len(index) == 4


def test_store_from_another_dataset_is_an_error(data, tmp_path):
    other = make_folder(tmp_path / "other", {"x": 3, "y": 3, "z": 3}, seed=5)
    other_store = make_store(other, tmp_path / "other.tls")
    with pytest.raises(ValueError, match="another dataset"):
        _loader(data, "torch", labels=other_store)
    wrong_k = make_store(data["images"], tmp_path / "k7.tls", num_classes=7)
    with pytest.raises(ValueError, match="K=7"):
        _loader(data, "dali", labels=wrong_k)


def test_missing_record_error_or_counted_one_hot(data, tmp_path):
    store = make_store(data["images"], tmp_path / "partial.tls", drop={"dog/001"})
    with pytest.raises(KeyError, match="dog/001.jpg"):
        _loader(data, "torch", labels=store)
    with pytest.warns(UserWarning, match="no label record"):
        loader = _loader(data, "torch", labels=store, missing_labels="one_hot", augment=NO_RA, erase=None)
    assert loader.num_missing_labels == 1
    missing = loader.index.paths.index("dog/001.jpg")
    seen = False
    for b in loader:
        for row, i in enumerate(b.indices):
            if i == missing:
                seen = True
                assert (b.maps.indices[row] == loader.index.targets[i]).all()
                assert (b.maps.values[row, 0] == 20.0).all()
                t = b.token_targets()[row]
                assert t.argmax(-1).eq(int(loader.index.targets[i])).sum() >= 1
    assert seen


def test_torch_workers_read_the_same_maps(data, tmp_path):
    """With worker processes the torch backend reads the maps in the workers (the store travels by
    path): the same maps as reading in the main process, the one-hot fall-back included."""
    store = make_store(data["images"], tmp_path / "partial.tls", drop={"dog/001"})
    kw = dict(labels=store, missing_labels="one_hot", augment=NO_RA, erase=None, seed=7)
    with pytest.warns(UserWarning, match="no label record"):
        in_main, in_workers = _loader(data, "torch", num_workers=0, **kw), _loader(data, "torch", num_workers=2, **kw)
    pairs = list(zip(in_main, in_workers))
    assert len(pairs) == len(in_main) == 3
    for a, b in pairs:
        assert np.array_equal(a.indices, b.indices)
        assert torch.equal(a.maps.values, b.maps.values) and torch.equal(a.maps.indices, b.maps.indices)
        assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "own_buffers"])
def test_torch_workers_reusing_slots_give_the_main_process_batches(tmp_path, monkeypatch, ring):
    """Worker batches travel through a ring of reused shared-memory slots (or, where no slot fits,
    their own buffers). Each worker here fills more batches than it has slots, and every batch is
    kept until the end: none may change after it was delivered, in either epoch."""
    from tl_fast.loaders.torch_backend import TorchBackend

    if not ring:
        monkeypatch.setattr(TorchBackend, "_slot_ring", lambda self, workers: None)
    root = make_folder(tmp_path / "imgs", {"a": 9, "b": 9}, seed=int(np.random.SeedSequence().entropy % 1000))
    store = make_store(root, str(tmp_path / "labels.tls"), topk=3, map_size=(6, 6))
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, seed=5, device="cpu", erase=None)
    in_main = TokenLabelLoader(root, store, num_workers=0, **kw)
    in_workers = TokenLabelLoader(root, store, num_workers=2, **kw)
    for _ in range(2):
        expected, got = list(in_main), list(in_workers)  # all held: a reused slot must not show through
        assert len(expected) == len(got) == 9
        for a, b in zip(expected, got):
            assert np.array_equal(a.indices, b.indices)
            assert torch.equal(a.images, b.images)
            assert torch.equal(a.maps.values, b.maps.values) and torch.equal(a.maps.indices, b.maps.indices)
    assert (in_workers._backend._ring is not None) == ring


def test_torch_two_live_iterations_of_one_loader_keep_their_batches(tmp_path):
    """A second iteration of a loader while the first is still alive (a peeked batch, say) must not
    write into the slots that hold the first one's batches."""
    root = make_folder(tmp_path / "imgs", {"a": 8, "b": 8}, seed=int(np.random.SeedSequence().entropy % 1000))
    store = make_store(root, str(tmp_path / "labels.tls"), topk=3, map_size=(6, 6))
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, seed=2, device="cpu", erase=None)
    expected = {tuple(b.indices): b for b in TokenLabelLoader(root, store, num_workers=0, **kw)}
    loader = TokenLabelLoader(root, store, num_workers=2, **kw)
    first = iter(loader)
    got = [next(first) for _ in range(2)]
    got += list(loader)  # the rest of epoch 0 while `first` is alive, its workers ahead in the slots
    got += list(first)  # then the rest of `first`
    assert len(got) == 2 + 6 + 6
    for b in got:
        a = expected[tuple(b.indices)]
        assert torch.equal(a.images, b.images) and torch.equal(a.maps.values, b.maps.values)


def test_torch_loader_without_room_in_dev_shm_says_what_to_do(data, monkeypatch):
    """Too small a /dev/shm (docker's default is 64 MB) for the workers' slots: an error that says
    how much and what to change, not a crash in a worker."""
    def no_room(self):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2_3>")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_room)
    with pytest.raises(RuntimeError, match=r"MB of shared memory .*\(2 workers\).*--shm-size"):
        next(iter(_loader(data, "torch", num_workers=2)))


def test_torch_workers_started_by_spawn_share_the_ring(tmp_path):
    """Workers started by ``spawn`` (``forkserver`` is Python 3.14's default on Linux) receive the
    ring by pickling rather than by fork, and deliver the same batches, two epochs running."""
    import torch.multiprocessing as mp

    root = make_folder(tmp_path / "imgs", {"a": 5, "b": 5}, seed=int(np.random.SeedSequence().entropy % 1000))
    store = make_store(root, str(tmp_path / "labels.tls"), topk=3, map_size=(6, 6))
    kw = dict(backend="torch", batch_size=2, image_size=S, patch_size=P, seed=9, device="cpu", erase=None)
    in_main = TokenLabelLoader(root, store, num_workers=0, **kw)
    in_workers = TokenLabelLoader(root, store, num_workers=2, **kw)
    method = mp.get_start_method()
    mp.set_start_method("spawn", force=True)
    try:
        for _ in range(2):
            expected, got = list(in_main), list(in_workers)
            assert len(expected) == len(got) == 5
            for a, b in zip(expected, got):
                assert torch.equal(a.images, b.images) and torch.equal(a.maps.values, b.maps.values)
    finally:
        mp.set_start_method(method, force=True)
    assert in_workers._backend._ring is not None


# -- agreement between backends ------------------------------------------------------------------

@pytest.mark.parametrize("augment", [NO_RA, AugmentConfig()], ids=["crop_flip", "randaugment"])
def test_backends_agree(data, augment):
    runs = {be: _epoch(_loader(data, be, augment=augment, erase=None, seed=3)) for be in BACKENDS}
    ref = runs["torch"]
    assert len(ref) == 3
    for be in ("dali", "ffcv"):
        assert len(runs[be]) == len(ref)
        for (i0, x0, y0, a0, m0, b0), (i1, x1, y1, a1, m1, b1) in zip(ref, runs[be]):
            assert np.array_equal(i0, i1) and torch.equal(y0, y1) and torch.equal(a0, a1)
            assert torch.equal(m0[0], m1[0]) and torch.equal(m0[1], m1[1])
            assert torch.equal(b0, b1)
            if augment.randaugment is None:  # pixel ops (solarize, posterize) amplify decoder noise
                diff = (_levels(x0) - _levels(x1)).abs()
                mean_tol, max_tol = (1.0, 4.5) if be == "dali" else (3.0, 24.5)
                assert diff.mean() <= mean_tol and diff.max() <= max_tol, (be, diff.mean(), diff.max())


def test_coordinate_image_lands_where_plan_says(tmp_path):
    root = tmp_path / "coords"
    os.makedirs(root / "a")
    for i, (h, w) in enumerate([(200, 256), (256, 180), (150, 150), (230, 240)]):
        Image.fromarray(coordinate_image(h, w)).save(root / "a" / f"{i}.jpg", quality=100, subsampling=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = make_store(str(root), tmp_path / "c.tls", num_classes=1, topk=1)
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    pack_ffcv(str(root), store, str(tmp_path / "c.beton"), num_workers=1, progress=False)
    size = 64
    data = {"images": str(root), "store": store, "beton": str(tmp_path / "c.beton")}
    cfg = AugmentConfig(scale=(0.25, 1.0), randaugment=None)
    for be in BACKENDS:
        loader = _loader(data, be, batch_size=4, image_size=size, augment=cfg, erase=None, seed=1)
        (batch,) = list(loader)
        img = _levels(batch.images)
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        u, v = (jj + 0.5) / size, (ii + 0.5) / size
        x, y = geometry.apply_affine(batch.affine.double(), u[None].double(), v[None].double())
        hw = torch.from_numpy(loader._sizes[batch.indices]).double()
        ex = x * hw[:, 1, None, None] - 0.5
        ey = y * hw[:, 0, None, None] - 0.5
        inner = np.s_[:, 3:-3, 3:-3]  # the resize filter sees the crop's border
        err_x = (img[:, 0] - ex)[inner].abs()
        err_y = (img[:, 1] - ey)[inner].abs()
        assert err_x.median() < 1.5 and err_y.median() < 1.5, (be, err_x.median(), err_y.median())
        assert err_x.quantile(0.95) < 4 and err_y.quantile(0.95) < 4, (be, err_x.max(), err_y.max())


def test_randaugment_geometry_follows_label_affine(tmp_path):
    """The device warp composes with the backend's crop into exactly ``plan.affine``."""
    from tl_fast.loaders.torch_backend import TorchBackend

    root = tmp_path / "coords"
    os.makedirs(root / "a")
    for i in range(8):
        Image.fromarray(coordinate_image(220, 250)).save(root / "a" / f"{i}.jpg", quality=100, subsampling=0)
    loader = TokenLabelLoader(str(root), None, backend="torch", batch_size=8, image_size=64, patch_size=8,
                              num_workers=0, device="cpu", augment=AugmentConfig(), erase=None, seed=4)
    plans = EpochPlans(loader.plan_maker(0), loader._batches(0))
    images, idx, _ = next(iter(loader._backend.iterate(plans)))
    plan = plans[0]
    assert np.array_equal(plan.index, idx)
    geometric = np.isin(plan.ra_op, [RA_OPS.index(n) for n in RA_GEOMETRIC])
    plan = replace(plan, ra_op=np.where(geometric, plan.ra_op, -1))  # keep the warp, drop pixel ops
    assert geometric.any()
    out = _levels(augment_batch(images, plan))
    ii, jj = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    u, v = (jj + 0.5) / 64, (ii + 0.5) / 64
    x, y = geometry.apply_affine(torch.from_numpy(plan.affine), u[None].double(), v[None].double())
    ex, ey = x * 250 - 0.5, y * 220 - 0.5
    inside = (ex > 2) & (ex < 247) & (ey > 2) & (ey < 217)
    inside[:, :3] = inside[:, -3:] = False
    inside[:, :, :3] = inside[:, :, -3:] = False
    assert (out[:, 0] - ex)[inside].abs().median() < 1.5
    assert (out[:, 1] - ey)[inside].abs().median() < 1.5


# -- epochs, resume, eval, sharding ------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_same_batches(data, backend):
    full = _epoch(_loader(data, backend, seed=5))
    first = _loader(data, backend, seed=5)
    it = iter(first)
    next(it)
    state = first.state_dict()
    assert state["step"] == 1
    it.close()
    resumed = _loader(data, backend, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # same epoch: keeps the position
    rest = _epoch(resumed)
    assert len(rest) == len(full) - 1
    for a, b in zip(full[1:], rest):
        assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[4][0], b[4][0])
        assert torch.equal(a[5], b[5])
    assert resumed.epoch == 1 and resumed.state_dict()["step"] == 0


def test_epochs_reshuffle_and_len(data):
    loader = _loader(data, "dali")
    e0 = [b.indices for b in loader]
    e1 = [b.indices for b in loader]  # the epoch advanced by itself
    assert len(e0) == len(loader) == 3
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))
    assert sorted(np.concatenate(e0)) == list(range(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader(data, backend):
    loader = _loader(data, backend, batch_size=5, train=False)
    batches = list(loader)
    assert [len(b) for b in batches] == [5, 5, 2]
    assert np.array_equal(np.concatenate([b.indices for b in batches]), np.arange(12))
    for b in batches:
        assert b.maps is None and b.mix_box is None
        a = b.affine.numpy()
        assert (a[:, 0, 0] > 0).all() and np.allclose(a[:, 0, 1], 0)  # centre crop, no flip


def test_token_targets_and_loss(data):
    from tl_fast import ops

    loader = _loader(data, "torch", mixtoken_per_sample=True)
    b = next(iter(loader))
    k = loader.num_classes
    t = b.token_targets()
    assert t.shape == (4, 1 + 16, k) and torch.allclose(t.sum(-1), torch.ones(4, 17))
    assert b.mix_box.shape == (4, 4)
    ref = ops.token_targets(b.maps.values, b.maps.indices, b.affine, num_classes=k, grid=(4, 4), smoothing=0.1,
                            mix_box=b.mix_box)
    assert torch.allclose(t, ref)
    cls, tok = torch.randn(4, k), torch.randn(4, 16, k)
    assert torch.allclose(b.loss(cls, tok, fused=False), b.loss(cls, tok, fused=True), atol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_loss_without_maps_mixes_the_class_labels(data, per_sample):
    """A label-less batch with a MixToken box: cross-entropy against the area-mixed smoothed one-hots,
    with lam counted on the token grid, like the token-labeling class target."""
    from tl_fast.ops.reference import mix_box_mask

    loader = _loader(data, "torch", labels=None, token_labels=False, mixtoken_per_sample=per_sample, seed=3)
    b = next(iter(loader))
    assert b.maps is None and b.mix_box is not None
    k, n = loader.num_classes, len(b)
    cls = torch.randn(n, k)
    smooth = torch.nn.functional.one_hot(b.labels, k).float() * (1 - 0.1) + 0.1 / k
    lam = 1 - mix_box_mask(b.mix_box, n, b.grid).float().mean((1, 2))
    target = lam[:, None] * smooth + (1 - lam[:, None]) * smooth.flip(0)
    expected = -(target * cls.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(b.loss(cls), expected, atol=1e-6)
    b.mix_box = None  # unmixed: plain smoothed cross-entropy
    assert torch.allclose(b.loss(cls), torch.nn.functional.cross_entropy(cls, b.labels, label_smoothing=0.1))


def _shard_worker(rank, world, init, backend, images, store, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loader = TokenLabelLoader(images, store, backend=backend, batch_size=2, image_size=S, patch_size=P,
                                  num_workers=0 if backend == "torch" else 1, device="cpu", seed=9)
        idx = torch.from_numpy(np.concatenate([b.indices for b in loader]))
        gathered = [torch.zeros_like(idx) for _ in range(world)]
        torch.distributed.all_gather(gathered, idx)
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_get_disjoint_shards_covering_the_epoch(data, tmp_path):
    backend = "dali"  # sharding lives in the loader, the same for every backend
    out = str(tmp_path / "shards.pt")
    init = f"file://{tmp_path / 'rendezvous'}"
    torch.multiprocessing.spawn(_shard_worker, args=(2, init, backend, data["images"], data["store"], out), nprocs=2)
    a, b = torch.load(out)
    assert len(a) == len(b) == 6
    assert not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(12))


# -- FFCV specifics -----------------------------------------------------------------------------------

def test_pack_ffcv_cli_with_downscale(data, tmp_path):
    from tl_fast.cli import main

    out = str(tmp_path / "small.beton")
    assert main(["pack-ffcv", data["images"], data["store"], out, "--max-side", "48", "--jpeg-quality", "95",
                 "--workers", "1"]) == 0
    small = {**data, "beton": out}
    a = _epoch(_loader(small, "ffcv", augment=NO_RA, erase=None))
    ref = _epoch(_loader(data, "torch", augment=NO_RA, erase=None))
    for x, y in zip(a, ref):
        assert np.array_equal(x[0], y[0]) and torch.equal(x[3], y[3]) and torch.equal(x[4][0], y[4][0])
        diff = (_levels(x[1]) - _levels(y[1])).abs()
        assert diff.mean() < 8  # a downscaled, re-encoded source: same content, softer
    from tl_fast.loaders.ffcv import read_packed

    info = read_packed(out)
    assert info.stored_sizes.max() <= 48 and np.array_equal(info.sizes, ImageFolderIndex(data["images"]).sizes)


@pytest.fixture(scope="module")
def unlabelled(data):
    """``data`` plus a .beton of the same images packed with ``pack-ffcv IMAGES OUT --no-labels``."""
    from tl_fast.cli import main

    out = str(data["root"] / "nolabels.beton")
    assert main(["pack-ffcv", data["images"], out, "--no-labels", "--workers", "1"]) == 0
    return {**data, "beton": out}


def test_pack_ffcv_without_labels_reads_like_the_labelled_pack(data, unlabelled):
    import json

    from tl_fast.loaders.ffcv import read_packed

    with open(unlabelled["beton"] + ".json") as f:
        meta = json.load(f)
    assert meta["has_records"] is False and meta["store"] is None and meta["topk"] is None
    info, ref_info = read_packed(unlabelled["beton"]), read_packed(data["beton"])
    assert not info.has_records and info.record_lengths is None and info.map_size is None
    assert np.array_equal(info.sizes, ref_info.sizes) and np.array_equal(info.targets, ref_info.targets)
    assert info.classes == ref_info.classes and info.num_classes == ref_info.num_classes
    # Same images, class ids, indices and plans as the labelled file read with token labels off.
    for kw in (dict(train=False), dict(augment=NO_RA, erase=None, token_labels=False, seed=5)):
        a = _loader(unlabelled, "ffcv", **kw)
        b = _loader(data, "ffcv", **kw)
        assert not a.has_token_labels and a.num_classes == b.num_classes and len(a) == len(b)
        ea, eb = _epoch(a), _epoch(b)
        assert len(ea) == len(eb) == 3
        for x, y in zip(ea, eb):
            assert np.array_equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
            assert torch.equal(x[3], y[3]) and x[4] is None and y[4] is None  # no maps
            assert (x[5] is None and y[5] is None) or torch.equal(x[5], y[5])  # the same MixToken box


def test_token_labels_from_unlabelled_pack_are_a_clear_error(data, unlabelled, tmp_path):
    from tl_fast.cli import main

    with pytest.raises(ValueError, match=r"packed without label records.*pack-ffcv IMAGES STORE OUT\.beton"):
        _loader(unlabelled, "ffcv", labels=data["store"], train=True)
    # Token labels off: the store is not needed, the file loads.
    assert not _loader(unlabelled, "ffcv", labels=data["store"], train=False).has_token_labels
    # No labels asked for: plain class labels for training.
    (batch, *_) = list(_loader(unlabelled, "ffcv", augment=NO_RA, erase=None))
    assert batch.maps is None and batch.labels.shape == (4,)
    assert batch.mix_box.shape == (4,)  # MixToken's box is drawn with or without token labels
    # The CLI asks for STORE or --no-labels, not both.
    out = str(tmp_path / "x.beton")
    with pytest.raises(SystemExit):
        main(["pack-ffcv", data["images"], out])
    with pytest.raises(SystemExit):
        main(["pack-ffcv", data["images"], data["store"], out, "--no-labels"])
    assert not os.path.exists(out)


def test_ffcv_pipeline_error_surfaces_instead_of_hanging(data):
    from ffcv.loader import OrderOption

    from tl_fast.loaders.ffcv import PlanCropDecoder, PlanRGBImageField, _GuardedLoader, add_plan_columns

    loader = _GuardedLoader(data["beton"], batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL,
                            pipelines={"image": [PlanCropDecoder(S), exploding_ffcv_op()], "label": None,
                                       "index": None, "record": None},
                            custom_fields={"image": PlanRGBImageField}, drop_last=False)
    add_plan_columns(loader)  # whole images, unflipped
    loader.timeout_s = 60
    with pytest.raises(RuntimeError, match="exploding transform"):
        for _ in loader:
            pass


def test_torch_worker_decode_error_names_the_file(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 4})
    loader = TokenLabelLoader(root, None, backend="torch", batch_size=2, image_size=S, patch_size=P, num_workers=1,
                              device="cpu")
    path = os.path.join(root, "a", "002.jpg")
    raw = bytearray(open(path, "rb").read())
    raw[2:] = os.urandom(len(raw) - 4) + b"\xff\xd9"[: len(raw) - 2 - (len(raw) - 4)]  # same size, garbage body
    with open(path, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(RuntimeError, match="002.jpg"):
        for _ in loader:
            pass


def test_ffcv_leaves_numba_shared_types_intact_and_compiles_before_returning(data):
    """FFCV 1.0.2 marked its state read-only by mutating numba's interned ``uint8[::1]`` type, which
    changed the hash of keys in numba's dispatcher tables (KeyError in a pipeline thread compiling its
    decoder, and in dispatcher finalizers). Each loader must also finish compiling on its pipeline
    thread (the first batch) before ``iter`` returns, so compilation never overlaps the caller."""
    import numba

    from tl_fast.loaders.ffcv import _GuardedEpochIterator

    u8 = numba.types.Array(numba.types.uint8, 1, "C")
    key, h = u8.key, hash(u8)
    started = []
    original_init = _GuardedEpochIterator.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        started.append(self)

    _GuardedEpochIterator.__init__ = init
    try:
        for seed in (0, 1):
            loader = _loader(data, "ffcv", seed=seed, augment=NO_RA)
            it = iter(loader)
            next(it)
            assert started[-1].first_batch_done.is_set()
            it.close()
            assert not started[-1].is_alive()
    finally:
        _GuardedEpochIterator.__init__ = original_init
    assert u8.mutable and u8.key == key and hash(u8) == h
    assert numba.types.Array(numba.types.uint8, 1, "C") is u8


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(1, 7), min_size=1, max_size=4),
                          st.sampled_from([torch.uint8, torch.float16, torch.int16, torch.int32, torch.float32])),
                min_size=1, max_size=4))
def test_torch_backend_batch_buffer_round_trip_any_layout(parts):
    """The torch backend sends a batch as one buffer: every part lands aligned, disjoint, and reads back."""
    from tl_fast.loaders.torch_backend import _batch_buffer, batch_views

    parts = [(tuple(shape), dtype) for shape, dtype in parts]
    buffer = _batch_buffer(parts)
    views = batch_views(buffer, parts)
    tensors = [torch.randint(0, 100, shape).to(dtype) for shape, dtype in parts]
    for view, t in zip(views, tensors):
        assert view.shape == t.shape and view.dtype == t.dtype
        assert (view.data_ptr() - buffer.data_ptr()) % view.element_size() == 0
        view.copy_(t)
    for view, t in zip(batch_views(buffer, parts), tensors):  # nothing overwrote anything
        assert torch.equal(view, t)


def test_torch_backend_pil_decoder_matches_torchvision(tmp_path, monkeypatch):
    """The torch backend's PIL fall-back (for a torchvision without image decoding) gives the same
    pixels as torchvision's decoder, and the backend uses it when torchvision's is missing."""
    from tl_fast.loaders import torch_backend

    make_folder(tmp_path / "imgs", {"a": 3, "b": 3}, seed=int(np.random.SeedSequence().entropy % 1000), smooth=False)
    paths = sorted(str(p) for p in (tmp_path / "imgs").rglob("*.jpg"))
    for path in paths:
        tv, pil = torch_backend.decode_rgb(path), torch_backend.decode_rgb_pil(path)
        assert tv.shape == pil.shape and tv.dtype == pil.dtype == torch.uint8
        assert (tv.int() - pil.int()).abs().max() <= 1, path
    monkeypatch.setattr(torch_backend, "decode_image", None)
    assert torch.equal(torch_backend.decode_rgb(paths[0]), torch_backend.decode_rgb_pil(paths[0]))
    with pytest.raises(RuntimeError, match="cannot decode"):
        torch_backend.decode_rgb(str(tmp_path / "missing.jpg"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("randaugment", [False, True])
def test_torch_backend_on_cuda_delivers_the_cpu_batch(tmp_path, randaugment):
    """Workers, the ring of reused slots and pinned copies on a GPU give the CPU's batch: the same maps and
    labels, and images equal without RandAugment, within one level with it (the GPU warps with
    ``grid_sample``, the CPU with OpenCV)."""
    root = make_folder(tmp_path / "imgs", {"a": 8, "b": 8}, seed=int(np.random.SeedSequence().entropy % 1000))
    store = make_store(root, str(tmp_path / "labels.tls"), topk=3, map_size=(6, 6))
    kw = dict(backend="torch", batch_size=2, image_size=32, patch_size=8, num_workers=2, seed=3, erase=None,
              augment=AugmentConfig() if randaugment else AugmentConfig(randaugment=None))
    cpu = list(TokenLabelLoader(root, store, device="cpu", **kw))
    gpu = list(TokenLabelLoader(root, store, device="cuda", **kw))  # 4 batches per worker, 3 ring slots each
    assert len(cpu) == len(gpu) == 8
    level = 1.0 / 255 / min(IMAGENET_STD) + 1e-5
    for a, b in zip(cpu, gpu):
        assert b.images.is_cuda and b.maps.values.is_cuda and b.labels.is_cuda
        assert torch.equal(b.maps.values.cpu(), a.maps.values) and torch.equal(b.maps.indices.cpu(), a.maps.indices)
        assert torch.equal(b.labels.cpu(), a.labels)
        diff = (b.images.cpu() - a.images).abs()
        if randaugment:
            assert diff.max() <= level and (diff > 1e-5).float().mean() < 0.02
        else:
            assert diff.max() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "ffcv"])
def test_loader_takes_a_source_object(data, backend):
    """A source built by the caller gives the batches of the same loader built from paths."""
    from tl_fast.loaders.source import ImageFolderSource, PackedSource

    source = (PackedSource(data["beton"]) if backend == "ffcv"
              else ImageFolderSource(data["images"], data["store"]))
    kw = dict(batch_size=4, image_size=S, patch_size=P, num_workers=1 if backend == "ffcv" else 0, device="cpu", seed=2)
    got = _epoch(TokenLabelLoader(source, backend=backend, **kw))
    want = _epoch(_loader(data, backend, **kw))
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        assert np.array_equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1:4], b[1:4]))
        assert torch.equal(a[4][0], b[4][0]) and torch.equal(a[5], b[5])
    with pytest.raises(ValueError, match="reads an ImageFolder directory"):
        TokenLabelLoader(PackedSource(data["beton"]), backend="torch", **kw)


def test_ffcv_decoder_reads_each_epochs_plan(data):
    """The FFCV decoder is compiled once and reads the crops written before each batch: its images
    follow the plan of every epoch (a stale or baked-in crop would drift from torch's in epoch 1),
    and each batch carries the plan it was made with."""
    kw = dict(augment=NO_RA, erase=None, seed=8)
    ffcv, ref = _loader(data, "ffcv", **kw), _loader(data, "torch", **kw)
    for epoch in range(2):
        got, want = list(ffcv), list(ref)
        assert len(got) == len(want) == 3 and got[0].epoch == epoch
        for a, b in zip(got, want):
            assert np.array_equal(a.indices, b.indices) and np.array_equal(a.plan.index, a.indices)
            assert np.array_equal(a.plan.crop, b.plan.crop) and torch.equal(a.affine, b.affine)
            assert torch.equal(a.mix_box, torch.as_tensor(a.plan.mix.boxes[0], dtype=torch.int32))
            diff = (_levels(a.images) - _levels(b.images)).abs()
            assert diff.mean() <= 3.0 and diff.max() <= 24.5, (a.epoch, diff.mean(), diff.max())
