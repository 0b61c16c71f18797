"""Experiment (2026-11-27): how should MixToken mix the class-token target? The trainer mixes it by area
(docs/spec.md section 3); this runs the same trainer with two alternatives.

    PYTHONPATH=. python experiments/mix_class_target.py --mix-cls-target content [trainer options]
    PYTHONPATH=. python experiments/mix_class_target.py --gt-weight 0.5 [trainer options]

* ``--mix-cls-target content`` weighs the two images of a mixed sample by what the mixed tokens' own
  targets show of each image's class (TokenMix-style, from the annotator's maps) instead of by area.
  It materializes the token targets, so it is slower than the fused loss.
* ``--gt-weight W`` takes a share W of the class-token target from the ground-truth label (mixed by
  area) and 1 - W from the annotator: a fixed blend, not the official ground-truth rule.

Every other option is ``tl-fast train``'s; docs/demo-evidence.md has the runs and what they showed.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Callable

import torch

from tl_fast import ops
from tl_fast.ops.class_loss import mix_lam, mixed_label_loss
from tl_fast.ops.reference import apply_mixtoken, mix_box_mask
from tl_fast.train.main import main as train_main


def content_mixtoken(targets: torch.Tensor, mix_box, grid: tuple[int, int]) -> torch.Tensor:
    """MixToken on unmixed targets ``[B, 1 + T, K]`` like :func:`~tl_fast.ops.reference.apply_mixtoken`,
    except that the class target mixes the two images by what the mixed grid shows of each image's
    class, not by area.

    With ``y_b`` the top class of sample b's class target, the weight of sample b is the sum over its
    tokens left outside the box of their target for ``y_b``, that of the partner ``B-1-b`` the sum over
    the pasted tokens of their target for ``y_partner``; normalized, and the area ``lam`` where both
    are zero. When every token's target is one-hot on its image's class this is the area rule."""
    mixed = apply_mixtoken(targets, mix_box, grid)
    b, t = targets.shape[0], targets.shape[1] - 1
    inside = mix_box_mask(mix_box, b, grid, targets.device).reshape(b, t)
    cls = targets[:, 0]
    top = cls.argmax(-1).view(b, 1, 1).expand(b, t, 1)
    score = targets[:, 1:].gather(2, top).squeeze(2).float()  # [B, T]: each token's target for its image's class
    own = (score * ~inside).sum(1)
    pasted = (score.flip(0) * inside).sum(1)
    total = own + pasted
    w = torch.where(total > 0, own / total.clamp_min(1e-12), mix_lam(mix_box, b, grid).to(total.device))
    w = w.to(cls.dtype).view(b, 1)
    mixed[:, 0] = w * cls + (1 - w) * cls.flip(0)
    return mixed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("class-target experiment (experiments/mix_class_target.py)")
    g.add_argument("--mix-cls-target", choices=("area", "content"), default="area",
                   help="how MixToken mixes the class-token target: 'area' (docs/spec.md section 3) or "
                        "'content' (see above)")
    g.add_argument("--gt-weight", type=float, default=0.0,
                   help="share of the ground-truth label (mixed by area) in the class-token target")


def make_loss(args: argparse.Namespace, token_model: bool) -> Callable:
    """The trainer's loss with the experiment's class target (token-labeled models only)."""
    if not (token_model and args.token_label and args.label_mode == "tokens"):
        raise SystemExit("mix_class_target.py: the experiment needs token labels on the model's tokens "
                         "(--label-mode tokens)")
    if not 0.0 <= args.gt_weight <= 1.0:
        raise SystemExit(f"mix_class_target.py: --gt-weight must be in [0, 1], got {args.gt_weight}")
    weights = dict(cls_weight=1.0 - args.gt_weight, dense_weight=args.dense_weight)

    def loss_fn(outputs, batch):
        cls, tokens = outputs
        if args.mix_cls_target == "content" and batch.mix_box is not None:
            targets = content_mixtoken(replace(batch, mix_box=None).token_targets(), batch.mix_box, batch.grid)
            loss = ops.token_label_loss(cls, tokens, targets, **weights)
        else:
            loss = batch.loss(cls, tokens, fused=args.fused_loss, **weights)
        if args.gt_weight > 0:
            loss = loss + args.gt_weight * mixed_label_loss(cls, batch.labels, batch.mix_box, batch.grid, args.smoothing)
        return loss

    return loss_fn


def main(argv: list[str] | None = None) -> dict:
    return train_main(argv, prog="mix_class_target.py", add_arguments=add_arguments, make_loss=make_loss)


if __name__ == "__main__":
    main()
    sys.exit(0)
