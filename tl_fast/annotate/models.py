"""Annotator models: build a classifier from a timm name or a ``module:callable`` path, load its
checkpoint, read its preprocessing (input size, mean, std, interpolation), and fingerprint its weights."""
from __future__ import annotations

import importlib
import inspect
import os
from typing import Any, Callable

import torch
from torch import nn

from ..augment.normalize import IMAGENET_MEAN, IMAGENET_STD
from ..models.digest import weights_digest  # noqa: F401  (part of this module's API)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def _call_with_supported(fn: Callable, **kwargs: Any):
    """Call ``fn`` with the keyword arguments it accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
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
        load_weights(model, checkpoint)
    return model.eval()


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """Input size, mean, std and interpolation from the model's ``pretrained_cfg`` (timm), or
    ImageNet defaults at 224 px."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    size = img_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
    interp = cfg.get("interpolation") or "bilinear"
    if interp not in INTERPOLATIONS:
        interp = "bilinear"
    return {"img_size": int(size), "mean": tuple(cfg.get("mean") or IMAGENET_MEAN),
            "std": tuple(cfg.get("std") or IMAGENET_STD), "interpolation": interp}
