"""What the trainer is made of: model, loaders, and timm's optimizer, schedule, EMA and grad scaler."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn

from .checks import InputError
from .distributed import DistInfo, barrier

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def is_token_model(model: nn.Module) -> bool:
    """``forward_train(x, mix_box)`` returns (class logits, token logits): an LV-ViT or a model wrapped by
    :func:`tl_fast.models.token_labeling`. Named types, not duck typing: timm's VOLO has a
    ``forward_train`` of another contract (its own box, three outputs)."""
    from tl_fast.models import is_token_labeling_model
    return is_token_labeling_model(model)


def supervises_tokens(args: argparse.Namespace) -> bool:
    """Whether the loss reaches the token logits: token labels in ``--label-mode tokens``."""
    return bool(args.token_label) and args.label_mode == "tokens"


def prepare_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The model as the run trains it: ``token_labeling(model)`` (aux token head, MixToken) when the run
    supervises or mixes tokens; the model itself otherwise (and an LV-ViT always)."""
    from tl_fast.models import LVViT, token_labeling
    if isinstance(model, LVViT) or args.label_mode != "tokens" or not (args.token_label or args.mixtoken):
        return model
    try:
        return token_labeling(model)
    except ValueError as err:
        raise InputError(f"--model {args.model} cannot train with token labels: {err} (or train its class output "
                         "alone with --label-mode class)") from None


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """An LV-ViT size (tl_fast.models) or any model ``timm.create_model`` builds, with the
    architecture overrides (--depth, --dim, --heads, --patch-size) passed through."""
    overrides = {k: v for k, v in dict(depth=args.depth, embed_dim=args.dim, num_heads=args.heads,
                                        patch_size=args.patch_size).items() if v is not None}
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path or 0.0, **overrides)
    from tl_fast.models import MODEL_NAMES, create_lvvit
    if args.model in MODEL_NAMES and not args.pretrained:
        try:
            return create_lvvit(args.model, img_size=args.img_size, **kwargs)
        except ValueError as err:  # a size that gives no whole token grid
            raise InputError(f"{args.model}: {err}: pick --img-size and --patch-size together") from None
    import timm
    try:  # ViT-like models size their position embedding from img_size; CNNs take no such argument
        return timm.create_model(args.model, pretrained=args.pretrained, img_size=args.img_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise SystemExit(f"error: timm cannot build {args.model} with {sorted(kwargs)}: {err}") from None
    except (RuntimeError, OSError) as err:  # unknown model, pretrained weights not found / not downloadable
        raise SystemExit(f"error: timm cannot build {args.model}" + (" with --pretrained" if args.pretrained else "")
                         + f": {err}") from None
    try:
        return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (TypeError, RuntimeError, OSError) as err:
        what = "with --pretrained" if args.pretrained and not isinstance(err, TypeError) else f"with {sorted(kwargs)}"
        raise SystemExit(f"error: timm cannot build {args.model} {what}: {err}") from None


def token_patch(model: nn.Module, img_size: int, token_model: bool) -> int:
    """The loader's token size in pixels: the model's total stride, so the loader's grid is the model's
    token grid; the whole image (one cell) for a model trained on its class output alone."""
    if not token_model:
        return img_size
    try:
        gh, _ = model.token_grid(img_size)
    except ValueError as err:
        raise InputError(f"--img-size {img_size}: {err}") from None
    return img_size // gh


def load_initial_checkpoint(model: nn.Module, path: str, classes: list[str] | None = None) -> list[str]:
    """Load weights to fine-tune from: this trainer's checkpoint (``model``), timm's (``state_dict``)
    or a bare state dict. A classifier whose shape differs (another class count), or that was trained
    on other classes than ``classes`` (by name, when the file records them), keeps its fresh
    initialization, and so does the token head of a :func:`~tl_fast.models.token_labeling` model that
    a plain timm checkpoint lacks; returns those keys. Any other mismatch is an error."""
    from tl_fast.models import LVViT, TokenLabeling

    from .checkpoint import check_initial_classes, load_file

    state = load_file(path, "cpu", "--initial-checkpoint")
    other_classes = classes is not None and not check_initial_classes(path, state, classes)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise InputError(f"--initial-checkpoint {path} holds no state dict: pass a checkpoint or a state dict file")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if other_classes:  # same count, other classes: the head would score them as these
        heads = classifier_keys(model, path)
        state = {k: v for k, v in state.items() if k not in heads}
    if isinstance(model, LVViT):  # official LV-ViT files: names, position-embedding size, heads
        from tl_fast.models import load_checkpoint
        before = {k: v.shape for k, v in model.state_dict().items()}
        try:
            load_checkpoint(model, state, strict=True)
        except RuntimeError as err:
            raise InputError(f"--initial-checkpoint {path}: {err}") from None
        return [k for k, s in before.items() if (k in state and state[k].shape != s) or (other_classes and k in heads)]
    own = model.state_dict()
    reinit = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if other_classes:
        reinit += [k for k in heads if k not in reinit]
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in reinit}, strict=False)
    missing = [k for k in missing if k not in reinit]
    if isinstance(model, TokenLabeling):  # a plain timm checkpoint into the wrapped model: the token head is new
        reinit += [k for k in missing if k.startswith("aux_head.")]
        missing = [k for k in missing if not k.startswith("aux_head.")]
    if missing or unexpected:
        raise InputError(f"--initial-checkpoint {path} does not fit {type(model).__name__}: missing "
                         f"{missing[:6]}, unexpected {unexpected[:6]}")
    return reinit


def classifier_keys(model: nn.Module, path: str) -> list[str]:
    """The state-dict keys of ``model``'s classifier (timm's ``pretrained_cfg["classifier"]``, and the
    aux head of a token-labeling wrapper)."""
    from tl_fast.models import TokenLabeling
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = (names,) if isinstance(names, str) else tuple(names or ())
    if isinstance(model, TokenLabeling):  # the token head scores the same classes
        names += ("aux_head",)
    keys = [k for k in model.state_dict() if any(k == n or k.startswith(n + ".") for n in names)]
    if not keys:
        raise InputError(f"--initial-checkpoint {path} was trained on other classes than the train split and "
                         f"{type(model).__name__} names no classifier to re-initialize: fine-tune from weights "
                         "without a class list (its 'model' state dict saved alone)")
    return keys


def make_loaders(args: argparse.Namespace, dist: DistInfo, patch: int, token_model: bool):
    """Train and val :class:`tl_fast.TokenLabelLoader`; the train batch is one accumulation step's share.
    A run that does not supervise tokens gets the maps in ``label_mode="class"`` (the class-token target only)."""
    from tl_fast import TokenLabelLoader
    from tl_fast.augment import EraseConfig
    from tl_fast.plan import AugmentConfig, RandAugmentConfig
    aa = None if args.aa in (None, "none") else RandAugmentConfig.parse(args.aa)
    common = dict(backend=args.loader, image_size=args.img_size, patch_size=patch, device=dist.device,
                  num_workers=args.workers, rank=dist.rank, world_size=dist.world_size, smoothing=args.smoothing,
                  seed=args.seed, channels_last=args.channels_last)
    train = TokenLabelLoader(_images(args, args.train_dir, dist), args.labels if args.token_label else None,
                             batch_size=args.batch_size // args.grad_accum_steps,
                             augment=AugmentConfig(scale=(args.crop_scale, 1.0), randaugment=aa), train=True,
                             erase=EraseConfig(prob=args.reprob) if args.reprob > 0 else None,
                             mixtoken=args.mixtoken, mixtoken_per_sample=args.mixtoken_per_sample,
                             token_labels=args.token_label,
                             label_mode="tokens" if token_model and args.label_mode == "tokens" else "class",
                             label_compat=args.label_compat, **common)
    # The val split's class ids are the train split's, matched by name (a val folder without the
    # first class would otherwise shift every id); a val class train lacks is an error.
    val = TokenLabelLoader(_images(args, args.val_dir, dist), None, batch_size=args.batch_size, train=False,
                           mixtoken=False, classes=train.classes, **common) if Path(args.val_dir).is_dir() else None
    return train, val


def _images(args, folder, dist):
    """FFCV reads a .beton: pack one beside the image folder on first use (rank 0; the others wait).
    The train split is packed with its label store; the val split without labels (eval reads no maps)."""
    if args.loader != "ffcv":
        return folder
    from tl_fast.loaders.ffcv_pack import pack_ffcv
    folder = Path(folder)
    train = folder == Path(args.train_dir)
    store = str(args.labels) if train else None
    out = folder.parent / (f"{folder.name}-{Path(args.labels).stem}.beton" if train else f"{folder.name}.beton")
    if dist.is_main and not out.exists():
        print(f"packing {folder} into {out} (first use of --loader ffcv)", flush=True)
        pack_ffcv(str(folder), store, str(out), num_workers=max(args.workers, 1), progress=not args.no_progress)
    barrier()
    return str(out)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 1024) -> float:
    """Linear scaling rule: ``base_lr`` is the rate for ``reference_batch`` images per step (all ranks)."""
    return base_lr * global_batch / reference_batch


def make_optimizer(args: argparse.Namespace, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory; norms, biases and ``model.no_weight_decay()`` names get no weight decay."""
    from timm.optim import create_optimizer_v2
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum)
    except (AssertionError, ValueError) as err:
        raise SystemExit(f"error: --opt {args.opt}: {err or 'unknown optimizer'} (see timm.optim.list_optimizers())") \
            from None


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int, lr: float):
    """timm's schedule stepped per optimizer step (``step_update``): linear warm-up from ``--warmup-lr``
    to the peak, then the schedule over the remaining epochs, down to ``--min-lr`` at the last step."""
    from timm.scheduler import create_scheduler_v2
    # A warm-up as long as the run would leave the schedule no steps (timm asserts on that): a run
    # shorter than its preset's warm-up warms up for half of it.
    warmup = min(args.warmup_epochs or 0.0, args.epochs / 2)
    sched, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs - warmup, warmup_epochs=warmup, warmup_prefix=True,
        warmup_lr=args.warmup_lr if args.warmup_lr is not None else lr * 1e-3,
        min_lr=args.min_lr if args.min_lr is not None else lr * args.min_lr_ratio,
        decay_epochs=args.decay_epochs or max(args.epochs / 3, 1), decay_rate=args.decay_rate,
        decay_milestones=[round(args.epochs * f) for f in (1 / 3, 2 / 3)],
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return sched


def make_ema(args: argparse.Namespace, model: nn.Module):
    """timm's ModelEmaV3 (None with --no-model-ema); its decay warms up with the step it is given."""
    if not args.model_ema:
        return None
    from timm.utils import ModelEmaV3
    return ModelEmaV3(model, decay=args.ema_decay, use_warmup=True).requires_grad_(False)


def make_scaler(args: argparse.Namespace, device: torch.device):
    """timm's NativeScaler for fp16 (bf16 and fp32 need none)."""
    if args.amp != "fp16":
        return None
    from timm.utils import NativeScaler
    return NativeScaler(device=device.type)
