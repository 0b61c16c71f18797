"""The built-in demo dataset: generated images, a trained machine annotator and its label store.

``prepare()`` makes, once, under ``$TL_FAST_DATA`` (default ``~/.cache/tl_fast/demo-v2``):

* ``train/<class>/*.jpg`` and ``val/<class>/*.jpg``: procedural scenes (see :mod:`tl_fast.demo.scenes`),
  16 classes (4 shapes x 4 colours) x (80 train + 40 val) images of 96..200 px by default;
* ``annotator.pt``: a small fully convolutional CNN (:mod:`tl_fast.demo.annotator`) trained on the
  train split, with its validation accuracy;
* ``train_labels.tlstore``: that annotator's dense top-5 score maps (12 x 12) for every training
  image, written by :func:`tl_fast.annotate.annotate` — the same code path as ``tl-fast annotate``;
* ``demo.json``: the manifest, written last. A second call finds it and returns at once.

Each step is itself idempotent (images carry their own marker, the checkpoint and store are written
atomically), so an interrupted ``prepare`` resumes at the step it was in.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .annotator import TrainConfig
from .generate import IMAGES_MARKER
from .scenes import GENERATOR_VERSION, SceneConfig

MANIFEST = "demo.json"
_MANIFEST_VERSION = 1
# The settings that determine the images; the others (annotator, top-k) only what is derived from them.
_IMAGE_SETTINGS = ("seed", "num_classes", "train_per_class", "val_per_class", "scene")


# The demo's scenes: small images (a 2-core machine trains on them in minutes) whose objects still fill
# part of the frame beside distractors, so random crops miss or cut the labelled object.
DEMO_SHAPES = ("disc", "triangle", "cross", "crescent")
DEMO_SCENE = SceneConfig(min_side=96, max_side=200, shapes=DEMO_SHAPES)
# Part of the default folder's name: bumped when the defaults change, so an older cache is left alone.
DATA_VERSION = 2


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the demo data. Tests shrink it; the defaults are the real demo."""

    seed: int = 0
    num_classes: int = 16
    train_per_class: int = 80
    val_per_class: int = 40
    scene: SceneConfig = DEMO_SCENE
    annotator: TrainConfig = field(default_factory=TrainConfig)
    topk: int = 5


@dataclass(frozen=True)
class DemoPaths:
    """Where ``prepare`` put things."""

    root: Path
    train: Path
    val: Path
    labels: Path  # label store of the train split
    annotator: Path  # annotator checkpoint
    num_classes: int
    classes: tuple[str, ...] = ()
    manifest: dict = field(default_factory=dict, compare=False, repr=False)


def default_root() -> Path:
    """``$TL_FAST_DATA`` or ``~/.cache/tl_fast/demo-v<DATA_VERSION>``."""
    env = os.environ.get("TL_FAST_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tl_fast" / f"demo-v{DATA_VERSION}"


def _paths(root: Path, config: DemoConfig, classes, manifest: dict) -> DemoPaths:
    return DemoPaths(root=root, train=root / "train", val=root / "val", labels=root / "train_labels.tlstore",
                     annotator=root / "annotator.pt", num_classes=config.num_classes, classes=tuple(classes),
                     manifest=manifest)


def prepare(root: str | os.PathLike | None = None, *, progress: bool = True,
            config: DemoConfig | None = None) -> DemoPaths:
    """Generate the demo images, train the demo annotator and annotate the train split, once.

    Args:
        root: cache directory (default :func:`default_root`).
        progress: show progress bars.
        config: dataset / annotator settings (default :class:`DemoConfig`); a directory made with
            other settings is an error, never silently mixed.
    """
    config = config or DemoConfig()
    root = Path(root).expanduser() if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".prepare.lock"):  # two processes preparing the same folder: one waits
        return _prepare(root, config, progress)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as f:  # "a": never truncates, so the lock file's mtime stays put
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prepare(root: Path, config: DemoConfig, progress: bool) -> DemoPaths:
    import torch

    from ..annotate import annotate, load_weights
    from .annotator import DemoCNN, train_annotator
    from .generate import generate_images

    settings = json.loads(json.dumps(asdict(config)))  # tuples -> lists, as read back from JSON
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        old = manifest.get("config") or {}
        same_images = all(old.get(k) == settings[k] for k in _IMAGE_SETTINGS)
        if manifest.get("version") != _MANIFEST_VERSION or not same_images:
            raise RuntimeError(f"{root} holds demo data made with other settings ({manifest_path}); pass another "
                               "directory (--data / TL_FAST_DATA) or delete this one")
        if old != settings or manifest.get("generator") != GENERATOR_VERSION:
            # Another generator version, annotator recipe or top-k: rebuilt below, step by step; each
            # step (images, annotator, labels) keeps what still matches.
            if progress and old != settings:
                print(f"{root}: the demo annotator settings changed; retraining it and re-annotating "
                      "(the images are kept)", flush=True)
            manifest = {}
        if manifest:
            paths = _paths(root, config, manifest["classes"], manifest)
            if all(p.exists() for p in (paths.train, paths.val, paths.labels, paths.annotator)):
                return paths
        manifest_path.unlink()  # stale, or something was deleted: rebuild what is needed

    classes = generate_images(root, num_classes=config.num_classes, train_per_class=config.train_per_class,
                              val_per_class=config.val_per_class, seed=config.seed, scene=config.scene,
                              progress=progress)
    paths = _paths(root, config, classes, {})
    # Identifies the exact images (settings + generator version): the annotator and the store
    # are reused only when made from these.
    data_id = hashlib.sha1((root / IMAGES_MARKER).read_bytes()).hexdigest()[:16]

    ann_cfg = config.annotator
    info = None
    if paths.annotator.is_file():
        saved = torch.load(paths.annotator, map_location="cpu", weights_only=True)
        if (saved.get("config") == asdict(ann_cfg) and saved.get("classes") == list(classes)
                and saved.get("data_id") == data_id):
            info = {k: v for k, v in saved.items() if k != "model"}
    if info is None:
        dense = _layout_maps(paths.train, classes, config) if ann_cfg.dense else None
        info = train_annotator(paths.train, paths.val, classes, paths.annotator, ann_cfg, progress=progress,
                               extra={"data_id": data_id}, dense_maps=dense)

    # The label store, through the annotate code path (same as `tl-fast annotate ... --model
    # tl_fast.demo.annotator:demo_cnn --checkpoint annotator.pt --img-size 96` for the default width).
    labels = _existing_labels(paths.labels, config, info, data_id)
    if labels is None:
        net = DemoCNN(num_classes=len(classes), width=ann_cfg.width)
        load_weights(net, paths.annotator)
        result = annotate(paths.train, paths.labels, model=net, img_size=ann_cfg.img_size, topk=config.topk,
                          batch_size=128, num_workers=0, device="cpu", progress=progress,
                          metadata={"demo": {"val_top1": info["val_acc"], "annotator": asdict(ann_cfg),
                                             "seed": config.seed, "data_id": data_id}})
        labels = {"map_size": list(result.map_size), "topk": result.topk, "num_classes": result.num_classes,
                  "annotate_train_top1": result.top1, "annotate_train_top5": result.top5}
    manifest = {
        "version": _MANIFEST_VERSION,
        "generator": GENERATOR_VERSION,
        "data_id": data_id,
        "config": settings,
        "classes": list(classes),
        "num_train": config.num_classes * config.train_per_class,
        "num_val": config.num_classes * config.val_per_class,
        "annotator": {"val_top1": info["val_acc"], "train_top1": info["train_acc"],
                      "train_seconds": info.get("train_seconds"),
                      "annotate_train_top1": labels["annotate_train_top1"],
                      "annotate_train_top5": labels["annotate_train_top5"]},
        "labels": {"path": paths.labels.name, "map_size": labels["map_size"], "topk": labels["topk"],
                   "num_classes": labels["num_classes"], "bytes": paths.labels.stat().st_size},
    }
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    return _paths(root, config, classes, manifest)


def _layout_maps(folder: Path, classes, config: DemoConfig):
    """Per-cell classes of every train image (``scenes.layout_class_map`` on its known layout), in
    ``annotator.load_split`` order: the dense supervision of the demo annotator."""
    import torch

    from .annotator import BACKGROUND, STRIDE
    from .scenes import layout_class_map, scene_layout

    grid = config.annotator.img_size // STRIDE
    background = None if config.annotator.background == "image" else BACKGROUND
    maps = []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(folder / name)):  # <class>_<index>.jpg
            index = int(Path(file).stem.rsplit("_", 1)[1])
            layout = scene_layout(config.seed, "train", label, index, config.num_classes, config.scene)
            maps.append(torch.from_numpy(layout_class_map(layout, grid, background)))
    return torch.stack(maps)


def _existing_labels(path: Path, config: DemoConfig, info: dict, data_id: str) -> dict | None:
    """The finished label store of an interrupted ``prepare`` (made by this annotator), or None."""
    from ..store import LabelStore, StoreError

    if not path.is_file():
        return None
    try:
        with LabelStore.open(path) as store:
            meta = store.metadata.get("annotator", {})
            if (len(store) != config.num_classes * config.train_per_class or store.topk != config.topk
                    or store.metadata.get("demo", {}).get("data_id") != data_id
                    or store.metadata.get("demo", {}).get("val_top1") != info["val_acc"]
                    or store.metadata.get("demo", {}).get("annotator") != asdict(config.annotator)):
                return None
            return {"map_size": list(store.map_size), "topk": store.topk, "num_classes": store.num_classes,
                    "annotate_train_top1": meta.get("image_top1"), "annotate_train_top5": meta.get("image_top5")}
    except StoreError:
        return None


__all__ = ["DemoConfig", "DemoPaths", "prepare", "default_root", "SceneConfig", "TrainConfig"]
