"""``tl-fast annotate``: run a classifier densely over an image folder and write a label store.

A machine annotator is an ordinary image classifier whose global pooling is removed, so that its
classifier is applied at every position of the last feature map and it emits a score map
``[K, h, w]`` per image instead of one K-vector. The top-k scores per position (and their class ids)
are written to a :class:`tl_fast.store.StoreWriter` store keyed by the image's relative path.

**Scores are the classifier's logits** (before any softmax), as in the public LV-ViT annotator maps;
the token-label ops apply the softmax after resampling.

Dense prediction, by model interface:

* timm models (``forward_features`` / ``forward_head``): the model's own head is applied to each
  position of the pre-pool features as a batch of 1 x 1 "images" (channels-first, channels-last or
  token layouts). Pooling a single position is the identity, so a plain linear head is exactly a
  1 x 1 convolution over the feature map, and heads with a pre-logits norm / MLP / conv (ConvNeXt,
  EfficientNet, MobileNetV3, ...) apply it per position too. Token models (ViT, DeiT, EVA, ...) drop
  their prefix (class, distillation, register) tokens and reshape the patch tokens to the patch grid.
* torchvision-style models with an ``avgpool`` global pool and an ``fc`` / ``classifier`` / ``head``
  module: the features entering ``avgpool`` are captured and the head applied per position.
* any model with ``forward_dense(x) -> (dense [B, K, h, w], logits [B, K])``.

The image-level prediction (used for the accuracy report) is the model's normal pooled output.
Images are resized whole (no crop, aspect ratio not kept) to ``img_size`` x ``img_size`` so that
map cell ``(y, x)`` covers the same normalized region of the source image at any image size, which is
what the token-label ops assume.

Resumable: every ``flush_every`` images the finished records go to ``STORE.partial/`` as a chunk
file keyed by image; a re-run with the same settings skips those images. The store itself is written
atomically at the end and the partial folder removed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .dataset import IMAGE_EXTENSIONS, image_key

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_PARTIAL_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


# ------------------------------------------------------------------------------------------------
# Image folder
@dataclass
class ImageList:
    """Images of an ImageFolder-layout root: classes sorted by name, files sorted within each class."""

    root: Path
    classes: list[str]
    paths: list[str]  # relative, '/'-separated
    labels: list[int]

    @property
    def keys(self) -> list[str]:
        return [image_key(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)


def list_images(root: str | os.PathLike) -> ImageList:
    """List ``root/<class>/**/<image>`` like torchvision's ImageFolder (and :mod:`tl_fast.dataset`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders; expected the ImageFolder layout root/<class>/<image>")
    paths, labels = [], []
    for label, c in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                    paths.append(f"{rel_dir}/{name}")
                    labels.append(label)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    keys = [image_key(p) for p in paths]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"two images under {root} share the store key {dup!r} (same name, different "
                         "extension); rename one")
    return ImageList(root, classes, paths, labels)


class _ImageDataset(torch.utils.data.Dataset):
    """Whole images resized to ``size`` x ``size``, as uint8 ``[3, S, S]`` (normalized on the device)."""

    def __init__(self, root: Path, paths: Sequence[str], size: int, interpolation: int):
        self.root, self.paths, self.size, self.interpolation = root, list(paths), size, interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as im:
                im.draft("RGB", (self.size, self.size))  # JPEG: let libjpeg decode at a reduced scale
                arr = np.array(im.convert("RGB").resize((self.size, self.size), self.interpolation))
            return torch.from_numpy(arr).permute(2, 0, 1), i, True
        except Exception as err:  # corrupt / truncated / unreadable: a counted skip (SPEC section 6)
            log.warning("skipping unreadable image %s (%s: %s)", path, type(err).__name__, err)
            return torch.zeros((3, self.size, self.size), dtype=torch.uint8), i, False


# ------------------------------------------------------------------------------------------------
# Models
def _call_with_supported(fn: Callable, **kwargs: Any):
    """Call ``fn`` with the keyword arguments it accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights from ``path``: a state dict, or a dict holding one under ``model`` /
    ``state_dict`` / ``model_state``; a ``module.`` prefix (DDP) is stripped. Strict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as err:
        raise RuntimeError(f"cannot load checkpoint {path} ({type(err).__name__}: {err})") from err
    state = obj
    if isinstance(obj, dict):
        for name in ("model", "state_dict", "model_state", "model_state_dict"):
            if isinstance(obj.get(name), dict):
                state = obj[name]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} holds no state dict (expected tensors, or a dict with a 'model' / "
                           "'state_dict' entry)")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"checkpoint {path} does not fit the model (wrong --model or --num-classes?): "
                           f"{err}") from err


def build_model(name: str, *, num_classes: int | None = None, checkpoint: str | os.PathLike | None = None,
                pretrained: bool = False, img_size: int | None = None) -> nn.Module:
    """A classifier from a timm model name or a ``module:callable`` path, in eval mode.

    timm models are created with ``pretrained=False`` unless ``pretrained`` is set (then timm loads
    weights only from what it can reach; nothing is downloaded in offline setups). ``num_classes``
    (and ``img_size`` for models that take it, e.g. ViTs) are passed when given; a callable gets the
    ones it accepts. ``checkpoint`` is loaded strictly afterwards.
    """
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
        except ModuleNotFoundError as err:
            raise ValueError(f"--model {name}: cannot import module {mod_name!r} ({err})") from err
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"--model {name}: {mod_name} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if img_size is not None:
            kwargs["img_size"] = int(img_size)
        model = _call_with_supported(obj, **kwargs) if callable(obj) else obj
        if not isinstance(model, nn.Module):
            raise TypeError(f"--model {name} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name}*")[:8]
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise ValueError(f"--model {name!r} is not a timm model name nor a module:callable path{hint}")
        model = None
        if img_size is not None:
            try:
                model = timm.create_model(name, pretrained=pretrained, img_size=int(img_size), **kwargs)
            except TypeError:  # the architecture has no img_size argument (CNNs): any size works
                model = None
        if model is None:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """Input size, mean, std and interpolation from the model's ``pretrained_cfg`` (timm), or
    ImageNet defaults at 224 px."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    size = img_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in _INTERPOLATION:
        interp = "bilinear"
    return {"img_size": int(size), "mean": tuple(cfg.get("mean") or IMAGENET_MEAN),
            "std": tuple(cfg.get("std") or IMAGENET_STD), "interpolation": interp}


def _fmt_of(model: nn.Module) -> str:
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


class DenseClassifier(nn.Module):
    """``forward(x) -> (dense_logits [B, K, h, w], image_logits [B, K])`` for a classifier.

    See the module docstring for the supported interfaces. ``rows_per_chunk`` bounds the number of
    positions passed through the head at once (memory)."""

    def __init__(self, model: nn.Module, rows_per_chunk: int = 32768):
        super().__init__()
        self.model = model
        self.rows_per_chunk = int(rows_per_chunk)
        if callable(getattr(model, "forward_dense", None)):
            self.mode = "dense"
        elif callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
            self.mode = "timm"
        else:
            self.head = next((getattr(model, n) for n in ("fc", "classifier", "head")
                              if isinstance(getattr(model, n, None), nn.Module)), None)
            if not isinstance(getattr(model, "avgpool", None), nn.Module) or self.head is None:
                raise TypeError(
                    f"cannot make {type(model).__name__} dense: give a timm model (forward_features/"
                    "forward_head), a torchvision-style model with `avgpool` and `fc`/`classifier`/`head`, "
                    "or a model with forward_dense(x) -> (dense [B,K,h,w], logits [B,K])")
            self.mode = "hooked"
            # A head that flattens by itself (torchvision ConvNeXt: LayerNorm2d, Flatten, Linear)
            # takes [N, C, 1, 1]; others take the flattened [N, C].
            self._head_4d = any(isinstance(m, nn.Flatten) for m in self.head.modules())

    def _per_position(self, head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
                      shape: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply ``head`` to each row of ``rows`` [N, C] (reshaped by ``shape``) -> [N, K]."""
        out = [head(shape(rows[i:i + self.rows_per_chunk])) for i in range(0, rows.shape[0], self.rows_per_chunk)]
        return torch.cat(out, 0)

    def _token_grid(self, n_tokens: int, x: torch.Tensor) -> tuple[int, int]:
        pe = getattr(self.model, "patch_embed", None)
        grid = None
        if pe is not None and callable(getattr(pe, "dynamic_feat_size", None)):
            grid = tuple(pe.dynamic_feat_size(tuple(x.shape[-2:])))
        elif pe is not None and getattr(pe, "grid_size", None) is not None:
            grid = tuple(pe.grid_size)
        if grid is None or grid[0] * grid[1] != n_tokens:
            side = math.isqrt(n_tokens)
            if side * side != n_tokens:
                raise ValueError(f"{type(self.model).__name__}: {n_tokens} patch tokens do not form a known "
                                 "grid; give a model with patch_embed.grid_size or a square grid")
            grid = (side, side)
        return int(grid[0]), int(grid[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        if self.mode == "dense":
            return m.forward_dense(x)
        if self.mode == "hooked":
            captured: list[torch.Tensor] = []
            handle = m.avgpool.register_forward_hook(lambda _m, inp, out: captured.append(inp[0]))
            try:
                logits = m(x)
            finally:
                handle.remove()
            feats = captured[-1]
            if m.avgpool(feats).shape[-2:] != (1, 1):
                raise TypeError(f"{type(m).__name__}.avgpool is not a global pool; cannot make it dense")
            b, c, h, w = feats.shape
            rows = feats.permute(0, 2, 3, 1).reshape(-1, c)
            shape = (lambda r: r[:, :, None, None]) if self._head_4d else (lambda r: r)
            dense = self._per_position(self.head, rows, shape)
            return dense.reshape(b, h, w, -1).permute(0, 3, 1, 2), logits
        feats = m.forward_features(x)
        logits = m.forward_head(feats)
        if feats.ndim == 4 and _fmt_of(m) == "NHWC":
            b, h, w, c = feats.shape
            rows, shape = feats.reshape(-1, c), (lambda r: r[:, None, None, :])
        elif feats.ndim == 4:
            b, c, h, w = feats.shape
            rows, shape = feats.permute(0, 2, 3, 1).reshape(-1, c), (lambda r: r[:, :, None, None])
        elif feats.ndim == 3:  # tokens [B, N, C]: prefix tokens first, then the patch grid row-major
            npt = int(getattr(m, "num_prefix_tokens", 1 if getattr(m, "cls_token", None) is not None else 0))
            b, n, c = feats.shape
            h, w = self._token_grid(n - npt, x)
            rows = feats[:, npt:].reshape(-1, c)
            # Each position becomes a sequence of (prefix slots + 1) copies of itself, so every
            # pooling mode (class token, average, max, attention pool) returns that position.
            shape = lambda r: r[:, None, :].expand(-1, npt + 1, -1)  # noqa: E731
        else:
            raise TypeError(f"{type(m).__name__}.forward_features returned shape {tuple(feats.shape)}; "
                            "expected [B, C, h, w], [B, h, w, C] or tokens [B, N, C]")
        dense = self._per_position(m.forward_head, rows, shape)
        return dense.reshape(b, h, w, -1).permute(0, 3, 1, 2), logits


# ------------------------------------------------------------------------------------------------
# Annotation
@dataclass
class AnnotateResult:
    """What ``annotate`` did. Accuracies are image-level (the model's pooled output) on folder labels."""

    store: Path
    num_images: int
    num_classes: int
    topk: int
    map_size: tuple[int, int]
    top1: float
    top5: float
    skipped: list[str] = field(default_factory=list)
    resumed: int = 0  # images taken from partial results of an earlier, interrupted run
    seconds: float = 0.0


def _fingerprint(settings: dict, keys: Sequence[str]) -> str:
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for k in keys:
        h.update(k.encode() + b"\n")
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha1 of a model's state dict: resuming must never mix maps of two different sets of weights."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Partial:
    """Finished records of an interrupted run: ``STORE.partial/part-NNNNNN.npz`` chunks + ``meta.json``."""

    def __init__(self, folder: Path, fingerprint: str, restart: bool):
        self.folder = folder
        meta = folder / "meta.json"
        # Nothing to lose without chunks: a stale or foreign folder with no results is replaced.
        if folder.exists() and (restart or not meta.is_file() or not any(folder.glob("part-*.npz"))):
            shutil.rmtree(folder)
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found.get("fingerprint") != fingerprint or found.get("version") != _PARTIAL_VERSION:
                raise RuntimeError(f"{folder} holds partial results of a run with other settings or images; "
                                   "pass --restart to discard them (or delete the folder)")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / "meta.json.tmp"
            tmp.write_text(json.dumps({"version": _PARTIAL_VERSION, "fingerprint": fingerprint}))
            os.replace(tmp, meta)
        for stale in folder.glob("tmp-*.npz"):  # a chunk being written when the run died
            stale.unlink()
        self.chunks = sorted(folder.glob("part-*.npz"))

    def _open(self, path: Path):
        try:
            return np.load(path, allow_pickle=False)
        except Exception as err:
            raise RuntimeError(f"partial result {path} is unreadable ({err}); pass --restart") from err

    def index(self) -> dict[str, Any]:
        """Keys, image-level predictions and skip flags of every finished image (maps stay on disk:
        at ImageNet scale they do not fit in memory)."""
        parts: dict[str, list[np.ndarray]] = {"keys": [], "pred": [], "skipped": []}
        map_size = None
        for path in self.chunks:
            with self._open(path) as z:
                for name in parts:
                    parts[name].append(z[name])
                map_size = tuple(int(v) for v in z["values"].shape[-2:])
        if not self.chunks:
            return {"keys": [], "map_size": None}
        out: dict[str, Any] = {name: np.concatenate(arrs) for name, arrs in parts.items()}
        out["keys"] = [str(k) for k in out["keys"]]
        out["map_size"] = map_size
        return out

    def records(self):
        """``(key, values [k, h, w], indices [k, h, w], skipped)`` of every finished image, in order."""
        for path in self.chunks:
            with self._open(path) as z:
                keys, values, indices, skipped = z["keys"], z["values"], z["indices"], z["skipped"]
            for i in range(len(keys)):
                yield str(keys[i]), values[i], indices[i], bool(skipped[i])

    def write(self, keys, values, indices, pred, skipped) -> None:
        path = self.folder / f"part-{len(self.chunks):06d}.npz"
        tmp = self.folder / f"tmp-{len(self.chunks):06d}.npz"  # not matched by part-*.npz if we die here
        np.savez(tmp, keys=np.asarray(keys, dtype=str), values=values, indices=indices, pred=pred,
                 skipped=np.asarray(skipped, dtype=bool))
        os.replace(tmp, path)
        self.chunks.append(path)


def annotate(
    images: str | os.PathLike,
    store: str | os.PathLike,
    *,
    model: str | nn.Module,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    topk: int = 5,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    lossy: bool = False,
    flush_every: int = 4096,
    restart: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    metadata: dict[str, Any] | None = None,
) -> AnnotateResult:
    """Annotate every image under ``images`` (ImageFolder layout) and write the store ``store``.

    Args:
        model: timm model name, ``module:callable`` path, or an ``nn.Module`` (then ``checkpoint``,
            ``num_classes`` and ``pretrained`` are not used).
        num_classes: K of the model; default: the number of class folders (or the model's own
            classifier with ``pretrained``).
        img_size: square input size; default: the model's ``pretrained_cfg`` input size, else 224.
        topk: scores kept per map position.
        flush_every: images per partial-result chunk (rounded up to whole batches).
        restart: discard partial results of an earlier run instead of resuming them.
        on_batch: called as ``on_batch(done, total)`` after each batch (progress hooks, tests).
        metadata: extra JSON entries for the store's metadata (beside ``annotator``).

    Unreadable images are skipped with a warning and listed in the result; they get no record.
    """
    start = time.perf_counter()
    imgs = list_images(images)
    keys = imgs.keys
    store = Path(store)
    if isinstance(model, nn.Module):
        net, model_name = model.eval(), type(model).__name__
    else:
        model_name = model
        if num_classes is None and not pretrained:
            num_classes = len(imgs.classes)
        net = build_model(model, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained,
                          img_size=img_size)
    dcfg = data_config(net, img_size)
    size = dcfg["img_size"]
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dense_net = DenseClassifier(net).to(dev)
    settings = {"model": model_name, "weights": weights_digest(net), "num_classes": num_classes,
                "pretrained": pretrained, "data": dcfg, "topk": int(topk), "amp": bool(amp),
                "root": str(imgs.root.resolve())}
    partial = _Partial(store.with_name(store.name + PARTIAL_SUFFIX), _fingerprint(settings, keys), restart)
    done = partial.index()
    n_done = len(done["keys"])
    if n_done and done["keys"] != keys[:n_done]:
        raise RuntimeError(f"{partial.folder} does not match the image list; pass --restart")

    mean = torch.tensor(dcfg["mean"], device=dev).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(dcfg["std"], device=dev).view(1, 3, 1, 1) * 255.0
    todo = imgs.paths[n_done:]
    dataset = _ImageDataset(imgs.root, todo, size, _INTERPOLATION[dcfg["interpolation"]])
    workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=dev.type == "cuda")
    flush_every = max(1, math.ceil(flush_every / batch_size)) * batch_size
    buf: dict[str, list] = {"keys": [], "values": [], "indices": [], "pred": [], "skipped": []}
    n_buf = 0
    idx_dtype = None
    k_model: int | None = None  # the model's K, from its output

    def flush() -> None:
        nonlocal n_buf
        if n_buf:
            partial.write(buf["keys"], np.concatenate(buf["values"]), np.concatenate(buf["indices"]),
                          np.concatenate(buf["pred"]), np.concatenate(buf["skipped"]))
            for v in buf.values():
                v.clear()
            n_buf = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=len(keys), initial=n_done, desc="annotate", unit="img", disable=not progress)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda")
    n_seen = n_done
    with torch.inference_mode():
        for batch, ids, ok in loader:
            x = (batch.to(dev, non_blocking=True).float() - mean) / std
            with autocast:
                dense, logits = dense_net(x)
            dense, logits = dense.float(), logits.float()
            if dense.ndim != 4 or logits.ndim != 2 or dense.shape[:2] != logits.shape:
                raise RuntimeError(f"{model_name}: dense output {tuple(dense.shape)} and logits "
                                   f"{tuple(logits.shape)} do not fit ([B, K, h, w] and [B, K])")
            k_model = k_cls = dense.shape[1]
            if topk > k_cls:
                raise ValueError(f"--topk {topk} exceeds the model's {k_cls} classes")
            finite = torch.isfinite(dense).flatten(1).all(1) | ~ok.to(dev)
            if not bool(finite.all()):
                bad = [todo[int(i)] for i in ids[~finite.cpu()]]
                raise RuntimeError(f"{model_name} produced NaN/inf scores for {', '.join(bad[:3])}")
            vals, cls = dense.topk(topk, dim=1)  # sorted, largest first
            if idx_dtype is None:
                idx_dtype = np.int16 if k_cls <= 32767 else np.int32
            pred = logits.topk(min(5, k_cls), dim=1).indices
            if pred.shape[1] < 5:
                pred = torch.cat([pred, pred[:, :1].expand(-1, 5 - pred.shape[1])], 1)
            buf["keys"].extend(keys[n_done + int(i)] for i in ids)
            buf["values"].append(vals.to(torch.float16).cpu().numpy())
            buf["indices"].append(cls.cpu().numpy().astype(idx_dtype))
            buf["pred"].append(pred.cpu().numpy().astype(np.int32))
            buf["skipped"].append(~ok.numpy())
            n_buf += len(ids)
            n_seen += len(ids)
            if n_buf >= flush_every:
                flush()
            bar.update(len(ids))
            if on_batch is not None:
                on_batch(n_seen, len(keys))
    flush()
    bar.close()

    res = partial.index()
    if res["keys"] != keys:
        raise RuntimeError(f"partial results in {partial.folder} are incomplete ({len(res['keys'])} of "
                           f"{len(keys)}); re-run")
    skipped = res["skipped"]
    labels = np.asarray(imgs.labels)
    good = ~skipped
    pred = res["pred"]
    top1 = float((pred[good, 0] == labels[good]).mean()) if good.any() else float("nan")
    top5 = float((pred[good] == labels[good, None]).any(1).mean()) if good.any() else float("nan")
    map_size = res["map_size"]
    # The store's K is the model's (class-id bounds); a fully resumed run never saw an output.
    k_cls = k_model if k_model is not None else _model_num_classes(dense_net, size, dev)
    if k_cls != len(imgs.classes):
        log.warning("the model has %d classes but %s has %d class folders: the accuracy report assumes "
                    "class i is the i-th folder in sorted order", k_cls, imgs.root, len(imgs.classes))
    metadata = {"annotator": {"model": model_name, "checkpoint": None if checkpoint is None else str(checkpoint),
                              "img_size": size, "scores": "logits", "image_top1": top1, "image_top5": top5,
                              "skipped": int(skipped.sum())}, **(metadata or {})}
    from .store import StoreWriter

    with StoreWriter(store, num_classes=k_cls, topk=topk, map_size=map_size, lossy=lossy,
                     metadata=metadata) as writer:
        for key, values, indices, bad in partial.records():
            if not bad:
                writer.add(key, values, indices)
    shutil.rmtree(partial.folder, ignore_errors=True)
    return AnnotateResult(store=store, num_images=int(good.sum()), num_classes=k_cls, topk=topk,
                          map_size=map_size, top1=top1, top5=top5,
                          skipped=[imgs.paths[i] for i in np.flatnonzero(skipped)], resumed=n_done,
                          seconds=time.perf_counter() - start)


@torch.inference_mode()
def _model_num_classes(dense_net: DenseClassifier, size: int, dev: torch.device) -> int:
    """K of a model whose class count was not given: one tiny forward pass."""
    was_training = dense_net.training
    dense_net.eval()
    _, logits = dense_net(torch.zeros(1, 3, size, size, device=dev))
    dense_net.train(was_training)
    return int(logits.shape[1])


# ------------------------------------------------------------------------------------------------
# CLI
def _run(args: argparse.Namespace) -> int:
    try:
        res = annotate(
            args.images, args.store, model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
            pretrained=args.pretrained, img_size=args.img_size, topk=args.topk, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, amp=args.amp, lossy=args.lossy,
            flush_every=args.flush_every, restart=args.restart, progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"interrupted; finished chunks are kept in {args.store}{PARTIAL_SUFFIX} and a re-run resumes",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:
        print(f"tl-fast annotate: error: {err}", file=sys.stderr)
        return 1
    h, w = res.map_size
    print(f"wrote {res.store}: {res.num_images} images, top-{res.topk} of K={res.num_classes} on {h}x{w} maps"
          + (f" ({res.resumed} resumed)" if res.resumed else "") + f" in {res.seconds:.1f} s")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable image(s), e.g. {res.skipped[0]}")
    print(f"annotator image-level accuracy on the folder labels: top-1 {100 * res.top1:.2f}%, "
          f"top-5 {100 * res.top5:.2f}%")
    return 0


def register(subparsers) -> None:
    """Add ``tl-fast annotate``."""
    p = subparsers.add_parser(
        "annotate", help="run a classifier densely over an image folder and write a label store",
        description="Run a classifier over IMAGES (class subfolders, like ImageNet's train/) with its global "
        "pooling removed and its classifier applied at every position, keep the top-k logits per position, and "
        "write the label store STORE. Resumable: an interrupted run keeps finished chunks in STORE.partial/.")
    p.add_argument("images", help="image root: IMAGES/<class>/<image>")
    p.add_argument("store", help="label store to write")
    p.add_argument("--model", required=True,
                   help="timm model name (e.g. resnet50, vit_small_patch16_224) or module:callable returning a model")
    p.add_argument("--checkpoint", help="weights to load (state dict, or a dict with 'model'/'state_dict')")
    p.add_argument("--num-classes", type=int, help="classes of the model (default: number of class folders)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm: load pretrained weights (only if timm finds them locally or can download them)")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's, else 224)")
    p.add_argument("--topk", type=int, default=5, help="scores kept per map position (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: min(8, CPUs))")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--lossy", action="store_true", help="write the store's lossy (8-bit value) mode")
    p.add_argument("--flush-every", type=int, default=4096, help="images per partial-result chunk (resume points)")
    p.add_argument("--restart", action="store_true", help="discard partial results of an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
