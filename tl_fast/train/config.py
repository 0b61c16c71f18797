"""The trainer's command line: presets, options and the checks that turn a bad combination into one
``error:`` line. Imports only argparse, so ``tl-fast --help`` stays fast."""
from __future__ import annotations

import argparse
import textwrap

# Defaults that depend on the data: the demo presets are sized for two CPU cores and a few minutes.
PRESETS = {
    # Token labels without MixToken and no EMA, and the student, batch and learning rate best for the
    # hard-label baseline in the demo's sweep (docs/demo-evidence.md), for as many epochs as fit 5 minutes
    # on 2 cores; the LV-ViT it trains is sized by PRESET_MODEL_OVERRIDES.
    "demo": dict(model="lvvit_demo", img_size=64, epochs=23, batch_size=16, lr=0.04, warmup_epochs=1.0,
                 drop_path=0.0, aa="none", crop_scale=0.25, reprob=0.0, workers=2, label_mode="tokens",
                 mixtoken=False, model_ema=False, eval_every=3),
    # timm's narrow test ResNet (0.4M parameters) at 64 px: a CNN that trains on the demo in minutes.
    "demo-cnn": dict(model="test_resnet", img_size=64, epochs=10, batch_size=64, lr=0.02, warmup_epochs=1.0,
                     drop_path=0.0, aa="none", crop_scale=0.25, reprob=0.0, workers=2, label_mode="class",
                     model_ema=True, eval_every=1),
    "imagenet": dict(model="lvvit_s", img_size=224, epochs=300, batch_size=128, lr=1.6e-3, warmup_epochs=5.0,
                     drop_path=0.1, aa="rand-m9-mstd0.5-inc1", crop_scale=0.08, reprob=0.25, workers=8,
                     label_mode="tokens", model_ema=True, eval_every=1),
}
# Model options a preset sets only for its own model (--model left unset or equal to the preset's): the
# demo's LV-ViT is wider and sees 48 px in 6 px patches (an 8 x 8 token grid), while --preset demo --model NAME
# keeps NAME's.
PRESET_MODEL_OVERRIDES = {"demo": dict(dim=128, heads=4, patch_size=6, img_size=48)}

# LV-ViT sizes built by tl_fast.models (tl_fast.models.MODEL_NAMES); any other name goes to timm.create_model.
LVVIT_NAMES = ("lvvit_demo", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l")
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant")

DESCRIPTION = """Train an image classifier with token labeling: a thin trainer over tl_fast.TokenLabelLoader.

LV-ViT models (lvvit_demo/t/s/m/l) and any other model timm.create_model builds (vit_small_patch16_224,
volo_d1_224, swin_tiny_patch4_window7_224, convnext_tiny, ...) train with a dense loss on every token of their
final grid and MixToken (--label-mode tokens); --label-mode class trains the class output alone on the pooled
crop target. With no --data it trains on the built-in demo dataset (generated, annotated and stored on first
use), so the whole path runs on a laptop."""

EPILOG = """examples:
  %(prog)s --loader torch                          # demo data, CPU-sized LV-ViT, a few minutes
  %(prog)s --no-token-label                        # the same, class-token labels only (baseline)
  %(prog)s --preset demo-cnn                       # a small timm CNN on the demo data, pooled machine labels
  %(prog)s --model vit_tiny_patch16_224 --patch-size 8  # a timm ViT with token labeling on the demo data
  %(prog)s --resume                                # continue exactly from <output>/last.pth
  torchrun --nproc_per_node 8 -m tl_fast.train --loader dali --data /imagenet \\
      --labels /imagenet/labels.tlstore --model lvvit_s   # LV-ViT-S recipe (lr 1.6e-3 per 1024 images)

--batch-size is per process and optimizer step (split into --grad-accum-steps loader batches); --lr is for a
global batch of 1024 and scaled linearly by batch-size x processes / 1024. Every epoch writes <output>/last.pth
atomically, evaluates top-1/top-5 of the model and its EMA on the val split and keeps the best epoch in
<output>/best.pth; <output>/log.jsonl has one JSON object per logged step/epoch, and <output>/curves.png
(matplotlib) draws them at the end (`tl-fast plot <output>` redraws it).
"""


USAGE = "%(prog)s [options]   (--help lists them)"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except unset options (those come from the preset)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser(prog: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    presets = "\n".join(textwrap.fill(f"{k}: " + ", ".join(f"{a}={v}" for a, v in d.items()) + _overrides(k), 110,
                                       subsequent_indent="    ") for k, d in PRESETS.items())
    p = argparse.ArgumentParser(
        prog=prog, add_help=add_help, formatter_class=_Help, epilog=EPILOG, usage=USAGE,
        description=DESCRIPTION + "\n\nOptions left unset come from --preset: 'demo' without --data, 'imagenet' "
        "(the LV-ViT-S recipe) with it.\n" + presets)
    add_arguments(p)
    return p


def _overrides(preset: str) -> str:
    extra = PRESET_MODEL_OVERRIDES.get(preset)
    if not extra:
        return ""
    return f"; with model={PRESETS[preset]['model']}: " + ", ".join(f"{a}={v}" for a, v in extra.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--preset", choices=tuple(PRESETS), help="defaults for unset options (default: demo without "
                   "--data, imagenet with it)")
    d.add_argument("--loader", choices=("dali", "ffcv", "torch"), default="torch",
                   help="image pipeline; ffcv packs a .beton beside the data on first use")
    d.add_argument("--data", help="image root holding train/<class>/* and val/<class>/* (default: demo dataset)")
    d.add_argument("--labels", help="label store of the train split (tl-fast annotate / convert-pt); "
                   "default with --data: <data>/labels.tlstore")
    d.add_argument("--workers", type=int, help="loader worker processes / threads")
    d.add_argument("--img-size", type=int, help="training and evaluation resolution")
    d.add_argument("--aa", help="RandAugment spec such as rand-m9-mstd0.5-inc1, or 'none'")
    d.add_argument("--crop-scale", type=float, help="smallest random-resized-crop area fraction")
    d.add_argument("--reprob", type=float, help="random-erasing probability (0: off)")
    d.add_argument("--channels-last", action="store_true", help="channels_last images and model (faster convs on GPU)")
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"{', '.join(LVVIT_NAMES)} (LV-ViT; lvvit_demo is CPU-sized) or any name "
                   "timm.create_model builds (token labeling through tl_fast.models.token_labeling)")
    m.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights for --model")
    m.add_argument("--initial-checkpoint", metavar="PATH", help="start from these weights (a state dict, a timm or "
                   "official LV-ViT checkpoint, or this trainer's .pth); a classifier of another size is re-initialized")
    m.add_argument("--depth", type=int, help="override the number of blocks")
    m.add_argument("--dim", type=int, help="override the width (must divide by --heads)")
    m.add_argument("--heads", type=int, help="override the number of attention heads")
    m.add_argument("--patch-size", type=int, help="override the patch size")
    m.add_argument("--drop-path", type=float, help="stochastic depth rate")
    m.add_argument("--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile the training forward (backend: inductor when given without one)")
    t = p.add_argument_group("optimization")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="images per process and optimizer step")
    t.add_argument("--grad-accum-steps", type=int, default=1,
                   help="split each step's batch into this many loader batches, gradients accumulated")
    t.add_argument("--opt", default="adamw", help="any timm.optim.create_optimizer_v2 name (adamw, sgd, lamb, ...)")
    t.add_argument("--momentum", type=float, default=0.9, help="momentum of sgd-like optimizers")
    t.add_argument("--lr", type=float, help="learning rate for a global batch of 1024 (scaled linearly)")
    t.add_argument("--sched", choices=SCHEDULES, default="cosine", help="timm learning-rate schedule, per step")
    t.add_argument("--warmup-epochs", type=float, help="linear warm-up length")
    t.add_argument("--warmup-lr", type=float, help="learning rate at the start of warm-up (default: peak / 1000)")
    t.add_argument("--min-lr", type=float, help="final learning rate (default: peak x --min-lr-ratio)")
    t.add_argument("--min-lr-ratio", type=float, default=0.01, help="final learning rate / peak, unless --min-lr")
    t.add_argument("--decay-epochs", type=float, help="step / multistep schedules: epochs between decays "
                   "(default: a third of --epochs)")
    t.add_argument("--decay-rate", type=float, default=0.1, help="step / multistep schedules: factor per decay")
    t.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms, biases, pos/cls")
    t.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    t.add_argument("--model-ema", action=argparse.BooleanOptionalAction,
                   help="keep (and evaluate) an exponential moving average of the weights (default: the preset's)")
    t.add_argument("--ema-decay", "--model-ema-decay", dest="ema_decay", type=float, default=0.9998,
                   help="EMA decay, warmed up as 1 - (1 + step)^(-2/3)")
    t.add_argument("--amp", choices=("bf16", "fp16", "none"),
                   help="autocast dtype; fp16 adds a gradient scaler (default: bf16 on GPU, none on CPU)")
    t.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    t.add_argument("--seed", type=int, default=0)
    tl = p.add_argument_group("labels")
    tl.add_argument("--token-label", action=argparse.BooleanOptionalAction, default=True,
                    help="targets from the label store (see --label-mode); off: class-output CE on hard labels")
    tl.add_argument("--label-mode", choices=("tokens", "class"),
                    help="tokens: every token of the model's final grid and its class output (LV-ViT as it is, a "
                    "timm model through tl_fast.models.token_labeling: aux head, MixToken); class: the class output "
                    "alone on the pooled crop target (ReLabel's LabelPooling; default: the preset's, tokens)")
    tl.add_argument("--mixtoken", action=argparse.BooleanOptionalAction,
                    help="MixToken: tokens inside the batch's box come from the partner sample B-1-b, in the model's "
                    "first token map (default: the preset's, off in the demo; else on with token labels in "
                    "--label-mode tokens, off otherwise; --no-token-label --mixtoken mixes the hard labels by area, a "
                    "token-level CutMix baseline)")
    tl.add_argument("--mixtoken-per-sample", action="store_true", help="one MixToken box per sample")
    tl.add_argument("--dense-weight", type=float, default=1.0, help="weight of the token loss (paper: 0.5)")
    tl.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    tl.add_argument("--label-compat", choices=("tl_fast", "official"), default="tl_fast",
                    help="official: the official TokenLabeling targets (crop box passed to roi_align as (y1, x1, y2, "
                    "x2), smoothing t(1-s+s/K)+s/K), to reproduce the published recipe; README: Differences")
    tl.add_argument("--fused-loss", action=argparse.BooleanOptionalAction, default=True,
                    help="compute the token loss from the compressed maps without materializing targets")
    o = p.add_argument_group("output")
    o.add_argument("--output", default="runs/lvvit", help="folder for last.pth, best.pth, log.jsonl and curves.png")
    o.add_argument("--resume", nargs="?", const="auto", help="resume exactly from a checkpoint (default <output>/last.pth)")
    o.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all, with a resumable "
                   "checkpoint")
    o.add_argument("--eval-every", type=int, help="epochs between evaluations (the last epoch always "
                   "evaluates; default: the preset's)")
    o.add_argument("--log-every", type=int, default=10, help="steps between logged losses (each costs a sync)")
    o.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="draw <output>/curves.png at the end of the run (needs matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset ('demo' without --data, 'imagenet' with it)."""
    args.preset = args.preset or ("imagenet" if args.data else "demo")
    preset = PRESETS[args.preset]
    own_model = PRESET_MODEL_OVERRIDES.get(args.preset, {}) if args.model in (None, preset["model"]) else {}
    for key, value in {**preset, **own_model}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot see, reported as ``parser.error`` (usage + one ``error:`` line)."""
    if args.grad_accum_steps < 1:
        parser.error(f"--grad-accum-steps must be at least 1, got {args.grad_accum_steps}")
    if args.batch_size < 1 or args.batch_size % args.grad_accum_steps:
        parser.error(f"--batch-size {args.batch_size} does not split into --grad-accum-steps "
                     f"{args.grad_accum_steps} equal loader batches; use a multiple of {args.grad_accum_steps}")
    for name in ("epochs", "img_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resume and args.initial_checkpoint:
        parser.error("--resume continues a run with its own weights; drop --initial-checkpoint")
    import timm

    from tl_fast.models import MODEL_NAMES  # importing it registers LV-ViT with timm where supported
    if args.model not in MODEL_NAMES:
        if not timm.is_model(args.model):
            parser.error(f"unknown model {args.model!r}: use one of {', '.join(LVVIT_NAMES)} or a timm model name "
                         "(python -c \"import timm; print(timm.list_models('resnet*'))\")")
        if args.mixtoken and args.label_mode == "class":
            parser.error(f"--mixtoken mixes tokens inside the model; with --label-mode class {args.model} has no "
                         "token outputs (use --label-mode tokens)")
    if args.dense_weight != 1.0 and args.label_mode == "class":
        parser.error("--dense-weight weighs the token loss; --label-mode class trains the class output only")
