"""`tl-fast annotate`: dense prediction of classifiers, the written store, resume, CLI."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_fast.annotate import DenseClassifier, annotate, build_model, data_config, list_images
from tl_fast.cli import main as cli_main
from tl_fast.demo.annotator import DemoCNN
from tl_fast.store import LabelStore

CLASSES = ("ant", "bee", "cat")


def _image_folder(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """Tiny ImageFolder tree with varying sizes and formats (JPEG and PNG)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(24, 72, size=2))
            arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            arr[..., c] = 255  # a colour cue per class
            ext = ".png" if i == 1 else ".jpg"
            Image.fromarray(arr).save(root / name / f"img{i}{ext}")
    return root


def _preprocess(root: Path, paths, model, size: int) -> torch.Tensor:
    """What annotate feeds the model, computed independently: whole image resized, normalized."""
    cfg = data_config(model, size)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[cfg["interpolation"]]
    xs = []
    for p in paths:
        with Image.open(root / p) as im:
            im.draft("RGB", (size, size))
            arr = np.array(im.convert("RGB").resize((size, size), resample))
        xs.append(torch.from_numpy(arr).permute(2, 0, 1))
    return (torch.stack(xs).float() / 255.0 - mean) / std


def _store_arrays(path: Path):
    s = LabelStore.open(path)
    maps = s.read(np.arange(len(s)))
    return s, maps.values.numpy(), maps.indices.numpy()


def test_list_images_follows_imagefolder_order(tmp_path):
    root = _image_folder(tmp_path / "imgs", per_class=3)
    (root / "bee" / "notes.txt").write_text("not an image")
    imgs = list_images(root)
    assert imgs.classes == list(CLASSES)
    assert imgs.paths[:3] == ["ant/img0.jpg", "ant/img1.png", "ant/img2.jpg"]
    assert imgs.labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert imgs.keys[4] == "bee/img1"
    (root / "bee" / "img1.jpg").write_bytes((root / "bee" / "img0.jpg").read_bytes())
    with pytest.raises(ValueError, match="bee/img1"):
        list_images(root)


def test_timm_cnn_store_matches_dense_model(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = build_model("resnet10t", num_classes=len(CLASSES))
    res = annotate(root, tmp_path / "l.tls", model=model, img_size=64, topk=2, batch_size=4, num_workers=0,
                   progress=False)
    store, values, indices = _store_arrays(tmp_path / "l.tls")
    imgs = list_images(root)
    assert store.keys == imgs.keys
    assert (len(store), store.num_classes, store.topk, store.map_size) == (9, 3, 2, (2, 2))
    assert res.map_size == (2, 2) and res.num_images == 9 and not res.skipped
    assert values.dtype == np.float16 and indices.dtype == np.int16
    assert values.shape == (9, 2, 2, 2)

    x = _preprocess(root, imgs.paths, model, 64)
    with torch.no_grad():
        dense, logits = DenseClassifier(model)(x)
    top = dense.topk(2, dim=1)
    np.testing.assert_array_equal(indices, top.indices.numpy())
    np.testing.assert_allclose(values.astype(np.float32), top.values.half().float().numpy(), rtol=0, atol=1e-3)
    assert np.all(values[:, 0] >= values[:, 1])  # top-k sorted, largest first
    top1 = float((logits.argmax(1).numpy() == np.array(imgs.labels)).mean())
    assert res.top1 == pytest.approx(top1)
    assert store.metadata["annotator"]["scores"] == "logits"


def _pool_positions(dense: torch.Tensor) -> torch.Tensor:
    return dense.mean(dim=(2, 3))


@pytest.mark.parametrize("name", ["resnet10t", "efficientnet_b0"])
def test_dense_head_mean_equals_pooled_logits_for_avgpool_cnns(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    x = torch.randn(2, 3, 64, 96)  # a non-square input: h != w in the map
    with torch.no_grad():
        dense, logits = DenseClassifier(model)(x)
        ref = model(x)
    assert dense.shape[:2] == (2, 7) and dense.shape[2] != dense.shape[3]
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(_pool_positions(dense), ref, atol=1e-5, rtol=1e-5)


def test_dense_vit_avg_pool_and_token_grid():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64,
                              global_pool="avg", fc_norm=False, reg_tokens=2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense, logits = DenseClassifier(model)(x)
        feats = model.forward_features(x)
    assert dense.shape == (2, 5, 4, 4)
    # Average pooling then a linear head == the mean of the per-token head.
    torch.testing.assert_close(_pool_positions(dense), logits, atol=1e-5, rtol=1e-5)
    # Patch token r * 4 + c (after the class and register tokens) is map cell (r, c).
    npt = model.num_prefix_tokens
    assert npt == 3
    with torch.no_grad():
        per_token = model.head(feats[:, npt:])  # [B, 16, K]
    torch.testing.assert_close(dense.permute(0, 2, 3, 1).reshape(2, 16, 5), per_token, atol=1e-5, rtol=1e-5)


def test_dense_vit_class_token_model_drops_prefix_tokens():
    torch.manual_seed(0)
    model = build_model("vit_tiny_patch16_224", num_classes=4, img_size=48)
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        dense, logits = DenseClassifier(model)(x)
        feats = model.forward_features(x)
        ref = model.head(model.fc_norm(feats[:, 1:]))
    assert dense.shape == (1, 4, 3, 3)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(dense.permute(0, 2, 3, 1).reshape(1, 9, 4), ref, atol=1e-5, rtol=1e-5)


def test_dense_convnext_applies_head_norm_per_position():
    torch.manual_seed(0)
    model = build_model("convnext_atto", num_classes=6)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        dense, _ = DenseClassifier(model)(x)
        feats = model.forward_features(x)
        h, w = feats.shape[-2:]
        # Independent route: the model's own head on each 1x1 window of the feature map.
        ref = torch.stack([torch.stack([model.forward_head(feats[..., i:i + 1, j:j + 1]) for j in range(w)], -1)
                           for i in range(h)], -2)
    assert dense.shape == (1, 6, h, w) == ref.shape
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)


def test_dense_torchvision_resnet_via_avgpool_hook():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense, logits = DenseClassifier(model)(x)
    assert dense.shape == (2, 5, 2, 2)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(_pool_positions(dense), logits, atol=1e-5, rtol=1e-5)


def test_unsupported_model_has_a_clear_error():
    with pytest.raises(TypeError, match="forward_dense"):
        DenseClassifier(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not a timm model name"):
        build_model("no_such_model_xyz")


def test_module_callable_with_checkpoint_via_cli(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    torch.manual_seed(1)
    net = DemoCNN(num_classes=3).eval()
    torch.save({"model": net.state_dict(), "note": "demo"}, tmp_path / "ckpt.pt")
    rc = cli_main(["annotate", str(root), str(tmp_path / "cli.tls"), "--model", "tl_fast.demo.annotator:demo_cnn",
                   "--checkpoint", str(tmp_path / "ckpt.pt"), "--img-size", "32", "--topk", "3",
                   "--batch-size", "4", "--num-workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "top-1" in out and "4x4 maps" in out
    annotate(root, tmp_path / "api.tls", model=net, img_size=32, topk=3, batch_size=4, num_workers=0,
             progress=False)
    _, v1, i1 = _store_arrays(tmp_path / "cli.tls")
    _, v2, i2 = _store_arrays(tmp_path / "api.tls")
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_array_equal(i1, i2)
    # A checkpoint for another class count is refused with the reason.
    assert cli_main(["annotate", str(root), str(tmp_path / "bad.tls"), "--model", "tl_fast.demo.annotator:demo_cnn",
                     "--checkpoint", str(tmp_path / "ckpt.pt"), "--num-classes", "4", "--img-size", "32",
                     "--num-workers", "0", "--no-progress"]) == 1
    assert "does not fit the model" in capsys.readouterr().err


def test_user_module_with_forward_dense(tmp_path, monkeypatch):
    (tmp_path / "my_annotator.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.conv = nn.Conv2d(3, num_classes, 8, stride=8)

            def forward_dense(self, x):
                d = self.conv(x)
                return d, d.amax(dim=(2, 3))

        def make(num_classes=3):
            torch.manual_seed(0)
            return Tiny(num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    root = _image_folder(tmp_path / "imgs")
    res = annotate(root, tmp_path / "u.tls", model="my_annotator:make", img_size=40, topk=3, num_workers=0,
                   progress=False)
    store, values, indices = _store_arrays(tmp_path / "u.tls")
    assert res.map_size == (5, 5) and store.num_classes == 3 and values.shape == (9, 3, 5, 5)
    assert np.array_equal(np.sort(indices, axis=1), np.broadcast_to(np.arange(3)[None, :, None, None], (9, 3, 5, 5)))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("stop_at", [6, 8])  # mid-chunk and right at a chunk boundary
def test_resume_after_interruption_gives_the_same_store(tmp_path, stop_at):
    root = _image_folder(tmp_path / "imgs", per_class=4)  # 12 images
    torch.manual_seed(0)
    model = DemoCNN(num_classes=3, width=4).eval()
    kw = dict(model=model, img_size=32, topk=2, batch_size=2, num_workers=0, flush_every=4, progress=False)
    full = annotate(root, tmp_path / "full.tls", **kw)

    def interrupt(done, total):
        if done == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        annotate(root, tmp_path / "part.tls", on_batch=interrupt, **kw)
    assert not (tmp_path / "part.tls").exists()
    assert len(list((tmp_path / "part.tls.partial").glob("block-*.tls"))) == stop_at // 4
    res = annotate(root, tmp_path / "part.tls", **kw)
    assert res.resumed == (stop_at // 4) * 4
    assert not (tmp_path / "part.tls.partial").exists()
    assert (res.top1, res.top5) == (full.top1, full.top5)
    assert (tmp_path / "part.tls").read_bytes() == (tmp_path / "full.tls").read_bytes()


def test_resume_refuses_other_settings_and_restart_discards(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    model = DemoCNN(num_classes=3, width=4).eval()
    kw = dict(model=model, img_size=32, batch_size=2, num_workers=0, flush_every=2, progress=False)

    def interrupt(done, total):
        if done == 4:
            raise _Stop

    with pytest.raises(_Stop):
        annotate(root, tmp_path / "s.tls", topk=2, on_batch=interrupt, **kw)
    with pytest.raises(RuntimeError, match="restart"):
        annotate(root, tmp_path / "s.tls", topk=3, **kw)
    other = DemoCNN(num_classes=3, width=4).eval()  # same settings, other weights: never mixed
    with pytest.raises(RuntimeError, match="restart"):
        annotate(root, tmp_path / "s.tls", topk=2, **{**kw, "model": other})
    res = annotate(root, tmp_path / "s.tls", topk=3, restart=True, **kw)
    assert res.resumed == 0 and LabelStore.open(tmp_path / "s.tls").topk == 3


def test_unreadable_image_is_a_counted_skip(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    good = (root / "cat" / "img0.jpg").read_bytes()
    (root / "cat" / "img0.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "cat" / "zz.jpg").write_bytes(b"not a jpeg at all")
    model = DemoCNN(num_classes=3, width=4).eval()
    res = annotate(root, tmp_path / "k.tls", model=model, img_size=32, topk=2, num_workers=0, progress=False)
    store = LabelStore.open(tmp_path / "k.tls")
    assert "cat/zz.jpg" in res.skipped
    assert "cat/zz" not in store.keys and len(store) == res.num_images == 10 - len(res.skipped)


# ------------------------------------------------------------------------------------------------
# Several ranks (gloo on CPU, loopback only)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranked_setup(tmp_path_factory):
    """16 images, a resnet10t checkpoint, and the one-process store (one thread, as in every rank)."""
    tmp = tmp_path_factory.mktemp("ranks")
    root = _image_folder(tmp / "imgs", per_class=5)
    (root / "cat" / "img9.jpg").write_bytes((root / "cat" / "img0.jpg").read_bytes())  # 16 images
    torch.manual_seed(0)
    ckpt = tmp / "r10.pt"
    torch.save(build_model("resnet10t", num_classes=3).state_dict(), ckpt)
    kw = dict(model="resnet10t", checkpoint=str(ckpt), img_size=64, topk=3, batch_size=2, num_workers=0,
              flush_every=4, progress=False, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = annotate(root, tmp / "one.tls", **kw)
    finally:
        torch.set_num_threads(threads)
    return tmp, root, kw, ref


def _same_records(a: Path, b: Path) -> None:
    sa, sb = LabelStore.open(a), LabelStore.open(b)
    assert sa.keys == sb.keys  # manifest order
    ra, la = sa.raw_records(np.arange(len(sa)))
    rb, lb = sb.raw_records(np.arange(len(sb)))
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(ra, rb)  # same bytes per record
    assert a.read_bytes() == b.read_bytes()  # and the same file (metadata holds no world size or time)


def test_two_ranks_under_torchrun_write_the_one_process_store(ranked_setup):
    import os
    import subprocess
    import sys

    tmp, root, kw, ref = ranked_setup
    assert ref.num_images == 16 and ref.map_size == (2, 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "tl_fast.cli", "annotate",
           str(root), str(tmp / "two.tls"), "--model", "resnet10t", "--checkpoint", kw["checkpoint"],
           "--img-size", "64", "--topk", "3", "--batch-size", "2", "--num-workers", "0", "--flush-every", "4",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_records(tmp / "one.tls", tmp / "two.tls")
    assert proc.stdout.count("wrote ") == 1 and "top-1" in proc.stdout  # rank 0 reports, rank 1 is quiet
    for rank in (0, 1):  # one summary line per rank in the log
        assert f"annotate rank {rank}/2: 8 images in 2 blocks" in proc.stderr
    assert not (tmp / "two.tls.partial").exists()


def _rank_worker(rank: int, world: int, port: int, root, store, kw: dict, kill_at) -> None:
    """One rank as torchrun would start it (environment). ``kill_at = (rank, batch, block file)``:
    that rank SIGKILLs itself after that batch, once its writer thread has renamed that block file
    into place (the first block also waits for numba to load the encoder)."""
    import os
    import signal
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    batches = [0]

    def on_batch(done, total):
        batches[0] += 1
        if kill_at is not None and (rank, batches[0]) == kill_at[:2]:
            deadline = time.monotonic() + 120
            while not Path(kill_at[2]).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

    annotate(root, store, on_batch=on_batch, **kw)


def test_rank_killed_mid_run_resumes_with_the_same_records(ranked_setup, monkeypatch):
    import torch.multiprocessing as mp

    tmp, root, kw, ref = ranked_setup
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # this tl_fast in the children
    store = tmp / "killed.tls"
    partial = tmp / "killed.tls.partial"
    # 4 blocks of 4 images: rank 0 gets blocks 0 and 2, rank 1 blocks 1 and 3. Rank 1 dies on the
    # first batch of block 3, after handing over all of block 1.
    with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
        mp.spawn(_rank_worker, args=(2, _free_port(), root, store, kw, (1, 3, partial / "block-00000001.tls")),
                 nprocs=2, join=True)
    assert not store.exists()
    done = sorted(p.name for p in partial.glob("block-*.tls"))
    assert "block-00000001.tls" in done and "block-00000003.tls" not in done
    # Resume with another world size: one process does what is left.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = annotate(root, store, **kw)
    finally:
        torch.set_num_threads(threads)
    assert res.resumed == 4 * len(done) and res.rank_images == 16 - res.resumed
    assert (res.top1, res.top5) == (ref.top1, ref.top5)
    _same_records(tmp / "one.tls", store)
    assert not partial.exists()


def test_store_writer_copy_from_checks_the_layout(tmp_path):
    from tl_fast.store import StoreError, StoreWriter

    rng = np.random.default_rng(0)
    v = rng.normal(size=(3, 2, 4, 4)).astype(np.float16)
    i = rng.integers(0, 7, size=(3, 2, 4, 4))
    with StoreWriter(tmp_path / "a.tls", num_classes=7, topk=2, map_size=(4, 4)) as w:
        w.add_batch(["x/0", "x/1", "x/2"], v, i)
    with StoreWriter(tmp_path / "b.tls", num_classes=7, topk=2, map_size=(4, 4)) as w:
        w.add("y/0", v[0], i[0])
        with LabelStore.open(tmp_path / "a.tls") as a:
            w.copy_from(a)
    b = LabelStore.open(tmp_path / "b.tls")
    assert b.keys == ["y/0", "x/0", "x/1", "x/2"]
    maps = b.read(np.arange(4))
    np.testing.assert_array_equal(maps.values.numpy()[1:], v)
    np.testing.assert_array_equal(maps.indices.numpy()[1:], i)
    with pytest.raises(StoreError, match="differs"):
        with StoreWriter(tmp_path / "c.tls", num_classes=8, topk=2, map_size=(4, 4)) as w:
            w.copy_from(LabelStore.open(tmp_path / "a.tls"))
    assert not (tmp_path / "c.tls").exists()


def test_channels_last_gives_the_same_maps(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = build_model("resnet10t", num_classes=3)
    kw = dict(model=model, img_size=64, topk=2, batch_size=4, num_workers=0, progress=False, device="cpu")
    annotate(root, tmp_path / "nchw.tls", **kw)
    annotate(root, tmp_path / "nhwc.tls", channels_last=True, **kw)
    _, v1, i1 = _store_arrays(tmp_path / "nchw.tls")
    _, v2, i2 = _store_arrays(tmp_path / "nhwc.tls")
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(v1.astype(np.float32), v2.astype(np.float32), rtol=0, atol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_matches_the_cpu_store(tmp_path):
    """fp32 on the GPU (pinned copies, writer thread waiting on events) writes the CPU's maps; bf16
    autocast + channels-last writes a valid store whose top-1 class agrees almost everywhere."""
    root = _image_folder(tmp_path / "imgs", per_class=6)
    torch.manual_seed(0)
    model = build_model("resnet10t", num_classes=3)
    kw = dict(model=model, img_size=96, topk=2, batch_size=4, num_workers=2, flush_every=8, progress=False)
    cpu = annotate(root, tmp_path / "cpu.tls", device="cpu", **kw)
    gpu = annotate(root, tmp_path / "gpu.tls", device="cuda", profile=True, **kw)
    _, v1, i1 = _store_arrays(tmp_path / "cpu.tls")
    _, v2, i2 = _store_arrays(tmp_path / "gpu.tls")
    assert (gpu.num_images, gpu.map_size) == (cpu.num_images, cpu.map_size)
    np.testing.assert_allclose(v1.astype(np.float32), v2.astype(np.float32), rtol=0, atol=2e-2)
    assert (i1[:, 0] == i2[:, 0]).mean() > 0.99
    assert set(gpu.stage_seconds) >= {"data", "forward", "dense head", "top-k", "hand-off", "writer"}
    annotate(root, tmp_path / "bf16.tls", device="cuda", amp=True, channels_last=True, **kw)
    store, v3, i3 = _store_arrays(tmp_path / "bf16.tls")
    store.verify()
    assert (i1[:, 0] == i3[:, 0]).mean() > 0.9


def test_store_binds_records_to_the_annotated_images(tmp_path):
    """Every record carries its image's fingerprint (one rank, and after the blocks are assembled),
    so the same store joined with other images of the same names is refused."""
    from tl_fast.dataset import ImageFolderIndex, join_labels

    root = _image_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    annotate(root, tmp_path / "l.tls", model=build_model("resnet10t", num_classes=len(CLASSES)), img_size=64,
             topk=2, batch_size=2, num_workers=0, flush_every=4, progress=False)
    store = LabelStore.open(tmp_path / "l.tls")
    index = ImageFolderIndex(root, progress=False)
    assert store.has_fingerprint().all()
    ids = store.lookup(index.keys)
    np.testing.assert_array_equal(store.fingerprints[0][ids], index.byte_sizes)
    np.testing.assert_array_equal(store.fingerprints[1][ids], index.fingerprints)
    assert (join_labels(index, store).record == ids).all()

    other = _image_folder(tmp_path / "other", seed=1)  # same relative paths, other pixels
    with pytest.raises(ValueError, match="are not the images the label store"):
        join_labels(ImageFolderIndex(other, progress=False), store)
