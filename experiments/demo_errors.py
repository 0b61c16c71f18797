"""Experiment (2026-12-07): what do the demo's students get wrong? Each run's checkpoint is evaluated on
the demo val split (the trainer's rule: class logits, plus 0.5 x the max over tokens for a token-label
run) and each error is sorted against the scene's known layout: a distractor in the image, the right
colour with the wrong shape, the right shape with the wrong colour, or neither.

    PYTHONPATH=. python experiments/demo_errors.py runs/demo/token_labeling/last.pth runs/demo/baseline/last.pth

Results: docs/demo-evidence.md ("The sweep on two seeds"). Reads the torch loader's centre crop, so its
top-1 can differ from the trainer's DALI figure by a few tenths of a point.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from tl_fast import TokenLabelLoader
from tl_fast.demo import default_root
from tl_fast.demo.scenes import ClassSpec, SceneConfig, class_specs, scene_layout
from tl_fast.models import create_lvvit

KINDS = ("distractor", "right colour, wrong shape", "right shape, wrong colour", "other")


def error_kind(true: ClassSpec, pred: ClassSpec, distractors: set[int]) -> str:
    if pred.index in distractors:
        return KINDS[0]
    return KINDS[1] if pred.colour == true.colour else KINDS[2] if pred.shape == true.shape else KINDS[3]


def demo_settings(data: Path) -> tuple[int, SceneConfig, list[ClassSpec]]:
    """Seed, scene settings and class specs of the demo folder, from the manifest ``prepare`` wrote."""
    config = json.loads((data / "demo.json").read_text())["config"]
    scene = SceneConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["scene"].items()})
    return config["seed"], scene, class_specs(config["num_classes"], scene.shapes)


def study(path: str, data: Path) -> tuple[float, Counter]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    args, classes = ckpt["args"], ckpt["classes"]
    size, patch = int(args["img_size"]), int(args["patch_size"])
    model = create_lvvit(args["model"], num_classes=len(classes), img_size=size, patch_size=patch,
                         embed_dim=int(args["dim"]), num_heads=int(args["heads"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    tokens = bool(args["token_label"])  # the checkpoint holds the parsed options (vars(args))
    val = TokenLabelLoader(str(data / "val"), None, batch_size=128, train=False, backend="torch", image_size=size,
                           patch_size=patch, num_workers=1, classes=classes)
    files = [f for c in classes for f in sorted((data / "val" / c).iterdir())]
    seed, scene, specs = demo_settings(data)
    kinds, right, n = Counter(), 0, 0
    with torch.no_grad():
        for batch in val:
            # model(x) is LV-ViT's inference rule; a hard-label run's token head was never trained
            pred = (model(batch.images) if tokens else model.forward_train(batch.images)[0]).argmax(1)
            for i, y, q in zip(batch.indices.tolist(), batch.labels.tolist(), pred.tolist()):
                n += 1
                if q == y:
                    right += 1
                    continue
                index = int(files[i].stem.rsplit("_", 1)[1])
                layout = scene_layout(seed, "val", y, index, len(specs), scene)
                kinds[error_kind(specs[y], specs[q], {o.label for o in layout.objects if not o.main})] += 1
    return 100.0 * right / n, kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="last.pth / best.pth of demo runs (lvvit_demo)")
    p.add_argument("--data", type=Path, default=default_root(), help="the demo data the runs trained on")
    a = p.parse_args()
    torch.set_num_threads(2)
    for path in a.checkpoints:
        top1, kinds = study(path, a.data)
        errors = sum(kinds.values())
        shares = ", ".join(f"{k} {100 * kinds[k] / errors:.0f}%" for k in KINDS)
        print(f"{path}: top-1 {top1:.2f}%; errors: {shares}")


if __name__ == "__main__":
    main()
