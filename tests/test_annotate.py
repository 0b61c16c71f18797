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
