"""The built-in demo dataset: deterministic scenes, ImageNet layout, prepare() end to end."""
from __future__ import annotations

import dataclasses

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tl_fast.annotate import annotate, list_images, load_weights
from tl_fast.cli import build_parser
from tl_fast.demo import DemoConfig, default_root, prepare
from tl_fast.demo.annotator import DemoCNN, TrainConfig
from tl_fast.demo.generate import generate_images
from tl_fast.demo.scenes import (SceneConfig, SceneLayout, SceneObject, class_specs, layout_class_map,
                                  render_scene, scene_layout)
from tl_fast.store import LabelStore

SMALL_SCENE = SceneConfig(min_side=48, max_side=80)
TINY = DemoConfig(num_classes=3, train_per_class=5, val_per_class=2, scene=SMALL_SCENE,
                  annotator=TrainConfig(img_size=32, width=4, epochs=1, batch_size=8), topk=2)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes_are_distinct_and_sorted_by_index():
    specs = class_specs(32)
    assert len({(s.shape, s.colour) for s in specs}) == 32
    assert [s.name for s in specs] == sorted(s.name for s in specs)
    with pytest.raises(ValueError):
        class_specs(1)


def test_scene_is_a_deterministic_jpeg_within_size_bounds():
    specs = class_specs(8)
    a = render_scene(7, "train", 3, 11, specs)
    assert a == render_scene(7, "train", 3, 11, specs)
    assert a != render_scene(7, "train", 3, 12, specs)
    assert a != render_scene(8, "train", 3, 11, specs)
    assert a != render_scene(7, "val", 3, 11, specs)
    sizes = []
    for i in range(6):
        with Image.open(io.BytesIO(render_scene(0, "train", i, i, specs))) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.append(im.size)
            assert all(160 <= s <= 400 for s in im.size) and max(im.size) / min(im.size) <= 1.7
    assert len(set(sizes)) > 1  # sizes and aspect ratios vary


def test_layout_main_object_inside_and_drawn_last():
    for i in range(20):
        lay = scene_layout(3, "train", i % 5, i, 5)
        main = lay.objects[-1]
        assert main.main and main.label == i % 5 and not any(o.main for o in lay.objects[:-1])
        assert 2 <= len(lay.objects) - 1 <= 4 and all(o.label != main.label for o in lay.objects[:-1])
        assert main.size / 2 <= main.cx <= lay.width - main.size / 2
        assert main.size / 2 <= main.cy <= lay.height - main.size / 2
        assert all(o.size < main.size for o in lay.objects[:-1])


def test_layout_class_map_names_the_object_on_top_and_the_background_given():
    # 80 x 40 image on a 4 x 4 grid: cell centres at x = 10, 30, 50, 70 and y = 5, 15, 25, 35.
    # Object 1 covers x 35-65, y 0-30; object 2, drawn after it, x 46-54, y 11-19; the main object
    # (label 0) x 66-74, y 31-39. Background cells take the label, 0, or the background given.
    lay = SceneLayout(80, 40, (SceneObject(1, 50.0, 15.0, 30, False), SceneObject(2, 50.0, 15.0, 8, False),
                               SceneObject(0, 70.0, 35.0, 8, True)))
    want = np.array([[0, 0, 1, 0],
                     [0, 0, 2, 0],
                     [0, 0, 1, 0],
                     [0, 0, 0, 0]])
    assert np.array_equal(layout_class_map(lay, 4), want)
    want[(want == 0)] = -1  # the annotator's "no class" background: only the main object's own cell keeps 0
    want[3, 3] = 0
    assert np.array_equal(layout_class_map(lay, 4, background=-1), want)
    real = scene_layout(0, "train", 3, 7, 8)
    m = layout_class_map(real, 12)
    assert m.shape == (12, 12) and set(np.unique(m)) <= {o.label for o in real.objects}
    main = real.objects[-1]
    assert m[int(main.cy / real.height * 12), int(main.cx / real.width * 12)] == 3


def test_annotator_background_cells_learn_no_class():
    """Object cells get the cross-entropy; background cells (BACKGROUND) have every score pulled to 0,
    a flat target after the softmax, so a crop's pooled target names the objects it holds."""
    import torch.nn.functional as F

    from tl_fast.demo.annotator import BACKGROUND, _dense_loss

    cells = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    maps = torch.full((2, 3, 3), BACKGROUND)
    maps[:, 1, 1] = 2
    _dense_loss(cells, maps, 0.0).backward()
    n = maps.numel()
    grad, x = cells.grad.permute(0, 2, 3, 1), cells.detach().permute(0, 2, 3, 1)
    background = maps == BACKGROUND
    assert torch.allclose(grad[background], 2 * x[background] / 5 / n)
    assert torch.allclose(grad[:, 1, 1], (x[:, 1, 1].softmax(-1) - F.one_hot(torch.tensor([2, 2]), 5)) / n)
    plain = torch.randint(0, 5, (2, 3, 3))  # no background: the plain cross-entropy
    assert torch.allclose(_dense_loss(cells, plain, 0.1), F.cross_entropy(cells, plain, label_smoothing=0.1))
    with pytest.raises(ValueError, match="background"):
        TrainConfig(background="dark")


def _main_object_coverage(config: DemoConfig, epochs: int, scale=(0.08, 1.0)) -> np.ndarray:
    """For every training crop the loaders' plan draws (``tl_fast.plan.random_resized_crop``) over the
    scenes' known layouts: the share of the main object's square box inside the crop."""
    from tl_fast.plan import random_resized_crop

    layouts = [scene_layout(config.seed, "train", c, i, config.num_classes, config.scene)
               for c in range(config.num_classes) for i in range(config.train_per_class)]
    sizes = np.array([(lay.height, lay.width) for lay in layouts])
    shares = []
    for epoch in range(epochs):
        crops = random_resized_crop(config.seed, epoch, np.arange(len(layouts)), sizes, scale=scale)
        for lay, (top, left, ch, cw) in zip(layouts, crops):
            (main,) = [o for o in lay.objects if o.main]
            half = main.size / 2
            ix = max(0.0, min(main.cx + half, left + cw) - max(main.cx - half, left))
            iy = max(0.0, min(main.cy + half, top + ch) - max(main.cy - half, top))
            shares.append(ix * iy / (main.size * main.size))
    return np.asarray(shares)


def test_random_resized_crops_often_miss_the_main_object():
    """The point of the demo: with the standard crop, image-level labels are often wrong for a crop."""
    config = DemoConfig(num_classes=8, train_per_class=10)
    shares = _main_object_coverage(config, epochs=2)
    assert 0.15 < (shares < 0.5).mean() < 0.7
    assert 0.0 < (shares == 0).mean() < (shares < 0.5).mean()
    whole = _main_object_coverage(config, epochs=2, scale=(1.0, 1.0))
    assert (whole >= 0.5).all()  # crops of the whole image's area always hold most of the main object


def test_scene_contains_the_main_objects_colour():
    """The labelled class's colour family dominates the rendered objects, not just the background."""
    specs = class_specs(16)
    red, yellow = specs[2], specs[8 + 2]  # red triangle, yellow triangle
    for spec in (red, yellow):
        with Image.open(io.BytesIO(render_scene(1, "train", spec.index, 0, specs))) as im:
            hsv = np.asarray(im.convert("HSV"), dtype=np.float32)
        saturated = hsv[..., 1] > 120
        hue = hsv[..., 0][saturated] * 360 / 255
        dist = np.abs((hue - spec.hue + 180) % 360 - 180)
        assert saturated.mean() > 0.03 and (dist < 25).mean() > 0.3


def test_generate_layout_determinism_and_idempotence(tmp_path):
    kw = dict(num_classes=3, train_per_class=2, val_per_class=1, seed=5, scene=SMALL_SCENE, progress=False)
    names = generate_images(tmp_path / "a", **kw)
    generate_images(tmp_path / "b", **kw)
    assert names == sorted(names) and len(names) == 3
    for split, n in (("train", 2), ("val", 1)):
        assert sorted(os.listdir(tmp_path / "a" / split)) == names
        for c in names:
            files = sorted(os.listdir(tmp_path / "a" / split / c))
            assert len(files) == n and all(f.endswith(".jpg") for f in files)
    digest = _tree_digest(tmp_path / "a")
    assert digest == _tree_digest(tmp_path / "b")  # same seed, same bytes
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.jpg")}
    generate_images(tmp_path / "a", **kw)  # marker found: nothing rewritten
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*.jpg")}
    with pytest.raises(RuntimeError, match="other settings"):
        generate_images(tmp_path / "a", **{**kw, "seed": 6})
    assert not list(tmp_path.glob("a/*.tmp"))


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TL_FAST_DATA", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"
    monkeypatch.delenv("TL_FAST_DATA")
    assert default_root() == Path.home() / ".cache" / "tl_fast" / "demo-v2"  # versioned: old caches stay apart


def test_prepare_end_to_end_and_idempotent(tmp_path):
    paths = prepare(tmp_path / "demo", progress=False, config=TINY)
    assert paths.root == tmp_path / "demo" and paths.num_classes == 3
    assert paths.train.is_dir() and paths.val.is_dir() and paths.annotator.is_file()
    imgs = list_images(paths.train)
    assert len(imgs) == 15 and imgs.classes == list(paths.classes)

    store = LabelStore.open(paths.labels)
    assert store.keys == imgs.keys
    assert (store.num_classes, store.topk, store.map_size) == (3, 2, (4, 4))  # 32 px / stride 8
    maps = store.read(store.lookup(store.keys))
    assert maps.values.shape == (15, 2, 4, 4) and int(maps.indices.max()) < 3

    m = paths.manifest
    assert m["labels"]["map_size"] == [4, 4] and 0.0 <= m["annotator"]["val_top1"] <= 1.0
    assert json.loads((paths.root / "demo.json").read_text()) == m

    # The store is what the annotate path gives for the saved checkpoint.
    net = DemoCNN(num_classes=3, width=4)
    load_weights(net, paths.annotator)
    annotate(paths.train, tmp_path / "again.tls", model=net, img_size=32, topk=2, num_workers=0, progress=False)
    again = LabelStore.open(tmp_path / "again.tls").read(np.arange(15))
    assert torch.equal(again.values, maps.values) and torch.equal(again.indices, maps.indices)

    before = _tree_digest(paths.root)
    mtimes = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    again_paths = prepare(tmp_path / "demo", progress=False, config=TINY)
    assert again_paths == paths
    assert mtimes == {p: p.stat().st_mtime_ns for p in paths.root.rglob("*") if p.is_file()}
    assert _tree_digest(paths.root) == before

    with pytest.raises(RuntimeError, match="other settings"):
        prepare(tmp_path / "demo", progress=False, config=DemoConfig(num_classes=3, train_per_class=6,
                                                                      val_per_class=2, scene=SMALL_SCENE))

    # Another annotator recipe on the same images: the annotator and the labels are rebuilt, the
    # images kept.
    sharper = dataclasses.replace(TINY, annotator=dataclasses.replace(TINY.annotator, epochs=2, label_smoothing=0.0))
    image_mtimes = {p: p.stat().st_mtime_ns for p in paths.root.rglob("*.jpg")}
    rebuilt = prepare(tmp_path / "demo", progress=False, config=sharper)
    assert {p: p.stat().st_mtime_ns for p in paths.root.rglob("*.jpg")} == image_mtimes
    assert rebuilt.manifest["config"]["annotator"]["epochs"] == 2
    saved = torch.load(rebuilt.annotator, map_location="cpu", weights_only=True)
    assert saved["config"] == dataclasses.asdict(sharper.annotator)
    assert LabelStore.open(rebuilt.labels).metadata["demo"]["annotator"] == dataclasses.asdict(sharper.annotator)
    assert prepare(tmp_path / "demo", progress=False, config=sharper) == rebuilt  # and then it is reused
    prepare(tmp_path / "demo", progress=False, config=TINY)  # back to the original recipe: rebuilt again
    assert not [p for p in paths.root.iterdir() if p.name.startswith("tmp")]


def test_prepare_resumes_after_losing_the_store(tmp_path):
    paths = prepare(tmp_path / "demo", progress=False, config=TINY)
    ckpt_mtime = paths.annotator.stat().st_mtime_ns
    first = paths.labels.read_bytes()
    paths.labels.unlink()
    again = prepare(tmp_path / "demo", progress=False, config=TINY)
    assert again.labels.read_bytes() == first  # re-annotated, same bytes
    assert paths.annotator.stat().st_mtime_ns == ckpt_mtime  # the annotator was not retrained


def test_prepare_rebuilds_data_of_an_older_generator(tmp_path):
    paths = prepare(tmp_path / "demo", progress=False, config=TINY)
    for name in ("images.json", "demo.json"):
        meta = json.loads((paths.root / name).read_text())
        meta["generator"] = 1
        (paths.root / name).write_text(json.dumps(meta))
    jpg = next(paths.train.rglob("*.jpg"))
    jpg.write_bytes(b"stale")
    again = prepare(tmp_path / "demo", progress=False, config=TINY)
    assert jpg.read_bytes()[:2] == b"\xff\xd8"  # regenerated
    assert again.manifest["generator"] == json.loads((paths.root / "images.json").read_text())["generator"] > 1


def test_cli_registers_demo_prepare():
    args = build_parser().parse_args(["demo", "prepare", "--data", "/some/dir"])
    assert args.data == "/some/dir" and callable(args.func)
