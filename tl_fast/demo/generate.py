"""Writes the demo images to disk in ImageNet layout (``train/<class>/*.jpg``, ``val/<class>/*.jpg``)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .scenes import GENERATOR_VERSION, SceneConfig, class_specs, render_scene

IMAGES_MARKER = "images.json"


def generate_images(
    root: Path,
    *,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    scene: SceneConfig = SceneConfig(),
    progress: bool = True,
) -> list[str]:
    """Generate the images under ``root`` unless a matching ``images.json`` marker says they exist
    (images of an older generator version with the same settings are replaced).

    Files are written to ``root/train.tmp`` / ``root/val.tmp`` and renamed into place only when
    complete, so an interrupted run leaves nothing that looks finished. Returns the class names.
    A single process is used on purpose: a scene takes a few milliseconds, so the whole default
    dataset takes about 20 s on one core and extra processes would mostly fight for the same cores.
    """
    specs = class_specs(num_classes, scene.shapes)
    names = [s.name for s in specs]
    settings: dict = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "scene": asdict(scene),
        "classes": names,
    }
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from the marker
    marker = root / IMAGES_MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found == settings:
            return names
        if {**found, "generator": GENERATOR_VERSION} != settings:
            raise RuntimeError(
                f"{root} holds demo images made with other settings ({marker}); "
                "pass another --data directory or delete this one"
            )
        marker.unlink()  # same settings, older generator: rebuild

    root.mkdir(parents=True, exist_ok=True)
    jobs = [(split, label, i) for split, n in (("train", train_per_class), ("val", val_per_class))
            for label in range(num_classes) for i in range(n)]
    for split in ("train", "val"):
        tmp = root / f"{split}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        for name in names:
            (tmp / name).mkdir(parents=True)
    for split, label, i in tqdm(jobs, desc="demo images", unit="img", disable=not progress):
        data = render_scene(seed, split, label, i, specs, scene)
        (root / f"{split}.tmp" / names[label] / f"{names[label]}_{i:04d}.jpg").write_bytes(data)
    for split in ("train", "val"):
        final = root / split
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / f"{split}.tmp", final)
    tmp_marker = marker.with_suffix(".tmp")
    tmp_marker.write_text(json.dumps(settings, indent=1))
    os.replace(tmp_marker, marker)
    return names
