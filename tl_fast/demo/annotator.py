"""The demo's machine annotator: a small fully convolutional CNN, trained on the demo train split
with the image labels and, per output cell, the scenes' known layouts (``TrainConfig.dense``).

The network follows timm's classifier interface (``forward_features`` -> ``[B, C, h, w]``,
``forward_head`` = global average pool + linear layer, ``pretrained_cfg`` with the input
normalization), so ``tl-fast annotate --model tl_fast.demo.annotator:demo_cnn`` runs it through the
same dense-prediction path as any timm model. Its total stride is 8: at the default 96 px input the
score map is 12 x 12 (each cell sees a 55 px receptive field, about the size of a main object).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
STRIDE = 8
BACKGROUND = -1  # the cell class of background in the dense maps when TrainConfig.background is "none"


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DemoCNN(nn.Module):
    """Six 3x3 conv-BN-ReLU layers (stride 8 in all), global average pooling, a linear classifier.

    Args:
        num_classes: number of output classes.
        width: channels of the first stage; later stages use 2x and 4x.
    """

    def __init__(self, num_classes: int = 32, width: int = 16) -> None:
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _conv_bn(3, w, 2),
            _conv_bn(w, 2 * w, 2),
            _conv_bn(2 * w, 2 * w),
            _conv_bn(2 * w, 4 * w, 2),
            _conv_bn(4 * w, 4 * w),
            _conv_bn(4 * w, 4 * w),
        )
        self.num_features = 4 * w
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        # What timm's ``resolve_data_config`` would read: how ``tl-fast annotate`` normalizes inputs.
        self.pretrained_cfg = {"mean": MEAN, "std": STD, "interpolation": "bilinear", "input_size": (3, 96, 96)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def demo_cnn(num_classes: int = 32, width: int = 16) -> DemoCNN:
    """Entry point for ``tl-fast annotate --model tl_fast.demo.annotator:demo_cnn``."""
    return DemoCNN(num_classes=num_classes, width=width)


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe of the demo annotator (a few minutes on two CPU cores at the defaults).

    Token labeling wants an annotator whose maps are right where the student looks. Measured on the
    demo preset's training crops of the 32-class data (docs/demo-evidence.md): the first recipe (18 epochs, label smoothing 0.1,
    image labels only) reached 83% val top-1, its class-token targets were right on 75% of crops,
    and background tokens (68% of all) named the image's class 19% of the time; 40 epochs without
    smoothing: 97%, 93%, 21%; with the layout supervision (``dense``): 99%, 97%, 45%. On the 16-class
    data, background cells that learn no class (``background="none"``) instead of the image's class
    raised the demo student's val top-1 by 1.7 and 2.0 points (seeds 0 and 1)."""

    img_size: int = 96
    width: int = 16
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.2  # peak SGD learning rate, cosine decay after one warm-up epoch
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    # Also supervise every output cell with the scene layout (``scenes.layout_class_map``): the
    # annotator stands in for a much stronger model (the student never sees layouts), whose maps
    # name the object under each cell.
    dense: bool = True
    # What background cells learn: "none", no class (every score 0, a flat target after the softmax),
    # so a crop's pooled target names the objects it holds; "image", the image's class, as context.
    background: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.background not in ("none", "image"):
            raise ValueError(f"TrainConfig.background must be 'none' or 'image', got {self.background!r}")


def load_split(folder: Path, img_size: int, classes: list[str], progress: bool = True,
               desc: str = "load") -> tuple[torch.Tensor, torch.Tensor]:
    """Whole images squashed to ``img_size`` square (as ``tl-fast annotate`` feeds them): uint8
    ``[N, 3, S, S]`` and labels ``[N]``, in ImageFolder order."""
    files = [(folder / c / f, i) for i, c in enumerate(classes) for f in sorted(os.listdir(folder / c))]
    images = torch.empty((len(files), 3, img_size, img_size), dtype=torch.uint8)
    for n, (path, _) in enumerate(tqdm(files, desc=desc, unit="img", disable=not progress, leave=False)):
        with Image.open(path) as im:
            im.draft("RGB", (img_size, img_size))
            arr = np.array(im.convert("RGB").resize((img_size, img_size), Image.BILINEAR))
        images[n] = torch.from_numpy(arr).permute(2, 0, 1)
    labels = torch.tensor([lab for _, lab in files], dtype=torch.int64)
    return images, labels


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255.0
    return (x.float() - mean) / std


def _augment(x: torch.Tensor, gen: torch.Generator, maps: torch.Tensor | None = None):
    """Batch augmentation on uint8 images: random flips and a random translation of up to 1/8.

    ``maps`` (``[B, g, g]`` cell classes at stride ``STRIDE``) follow the flip and the translation
    rounded to whole cells; returns ``(images, maps)``."""
    b, _, s, _ = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    pad = s // 8
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    if maps is not None:
        maps = torch.where(flip.view(b, 1, 1), maps.flip(2), maps)
        g = maps.shape[-1]
        rows = (torch.arange(g) + round((dy - pad) / STRIDE)).clamp(0, g - 1)
        cols = (torch.arange(g) + round((dx - pad) / STRIDE)).clamp(0, g - 1)
        maps = maps[:, rows][:, :, cols]
    return xp[:, :, dy:dy + s, dx:dx + s], maps


def _dense_loss(cells: torch.Tensor, maps: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on object cells; background cells (``BACKGROUND``) pull every score to 0."""
    background = maps == BACKGROUND
    ce = F.cross_entropy(cells, maps.clamp(min=0), label_smoothing=label_smoothing, reduction="none")
    flat = cells.pow(2).mean(1)
    return torch.where(background, flat, ce).mean()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the pooled output."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(_normalize(images[i:i + batch_size].float()))
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(images))


def train_annotator(
    train_dir: Path,
    val_dir: Path,
    classes: list[str],
    checkpoint: Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    progress: bool = True,
    extra: dict | None = None,
    dense_maps: torch.Tensor | None = None,
) -> dict:
    """Train the demo CNN and save ``{"model", "config", "classes", "val_acc", "train_acc", **extra}``
    atomically. With ``cfg.dense``, ``dense_maps`` (``[N, S / STRIDE, S / STRIDE]`` class per output
    cell, in the train split's load order; ``BACKGROUND`` on background) adds a per-cell loss to the
    image-level cross-entropy.

    Deterministic for a given seed and thread count on the CPU. Returns the saved dict (minus weights).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = load_split(train_dir, cfg.img_size, classes, progress, "load train")
    x_val, y_val = load_split(val_dir, cfg.img_size, classes, progress, "load val")
    if cfg.dense and (dense_maps is None or dense_maps.shape != (len(x_train),) + (cfg.img_size // STRIDE,) * 2):
        raise ValueError(f"cfg.dense needs dense_maps of shape [{len(x_train)}, {cfg.img_size // STRIDE}, "
                         f"{cfg.img_size // STRIDE}] (scenes.layout_class_map per train image)")
    model = DemoCNN(num_classes=len(classes), width=cfg.width)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    start = time.perf_counter()
    bar = tqdm(total=total, desc="train annotator", unit="step", disable=not progress)
    step = 0
    for _epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, maps = _augment(x_train[idx], gen, dense_maps[idx] if cfg.dense else None)
            features = model.forward_features(_normalize(x))
            loss = F.cross_entropy(model.forward_head(features), y_train[idx], label_smoothing=cfg.label_smoothing)
            if cfg.dense:
                fc = model.get_classifier()
                cells = F.conv2d(features, fc.weight[:, :, None, None], fc.bias)
                loss = loss + _dense_loss(cells, maps, cfg.label_smoothing)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    info = {
        "config": cfg.__dict__.copy(),
        "classes": list(classes),
        "val_acc": evaluate(model, x_val, y_val),
        "train_acc": evaluate(model, x_train, y_train),
        "train_seconds": round(seconds, 1),
        **(extra or {}),
    }
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    torch.save({"model": model.state_dict(), **info}, tmp)
    os.replace(tmp, checkpoint)
    return info
