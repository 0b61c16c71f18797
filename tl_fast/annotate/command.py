"""``tl-fast annotate``: the command line (also ``python -m tl_fast.annotate`` and under ``torchrun``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .partial import PARTIAL_SUFFIX
from .run import annotate


def _setup_logging() -> None:
    """INFO lines (each rank's summary) on stderr, prefixed by the rank under torchrun."""
    root = logging.getLogger()
    if root.handlers:
        return
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=logging.INFO, format=f"{prefix}%(message)s")


def _run(args: argparse.Namespace) -> int:
    _setup_logging()
    try:
        res = annotate(
            args.images, args.store, model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
            pretrained=args.pretrained, img_size=args.img_size, topk=args.topk, batch_size=args.batch_size,
            num_workers=args.num_workers, device=args.device, amp=args.amp, channels_last=args.channels_last,
            lossy=args.lossy, flush_every=args.flush_every, restart=args.restart, progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(f"interrupted; finished blocks are kept in {args.store}{PARTIAL_SUFFIX} and a re-run resumes",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as err:
        print(f"tl-fast annotate: error: {err}", file=sys.stderr)
        return 1
    if res.rank != 0:
        return 0
    h, w = res.map_size
    print(f"wrote {res.store}: {res.num_images} images, top-{res.topk} of K={res.num_classes} on {h}x{w} maps"
          + (f" ({res.resumed} resumed)" if res.resumed else "")
          + (f" by {res.world_size} ranks" if res.world_size > 1 else "") + f" in {res.seconds:.1f} s")
    if res.skipped:
        print(f"skipped {len(res.skipped)} unreadable image(s), e.g. {res.skipped[0]}")
    print(f"annotator image-level accuracy on the folder labels: top-1 {100 * res.top1:.2f}%, "
          f"top-5 {100 * res.top5:.2f}%")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", help="image root: IMAGES/<class>/<image>")
    p.add_argument("store", help="label store to write (under torchrun: on a filesystem every node shares)")
    p.add_argument("--model", required=True,
                   help="timm model name (e.g. resnet50, vit_small_patch16_224) or module:callable returning a model")
    p.add_argument("--checkpoint", help="weights to load (state dict, or a dict with 'model'/'state_dict')")
    p.add_argument("--num-classes", type=int, help="classes of the model (default: number of class folders)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm: load pretrained weights (only if timm finds them locally or can download them)")
    p.add_argument("--img-size", type=int, help="square input size (default: the model's, else 224)")
    p.add_argument("--topk", type=int, default=5, help="scores kept per map position (default 5)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass, per rank (default 64)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding workers per rank (default: min(8, CPUs / ranks on the node))")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available; under torchrun each rank takes "
                   "GPU LOCAL_RANK)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster CNNs on GPUs)")
    p.add_argument("--lossy", action="store_true", help="write the store's lossy (8-bit value) mode")
    p.add_argument("--flush-every", type=int, default=4096,
                   help="images per block: the unit of work and of resume (default 4096)")
    p.add_argument("--restart", action="store_true", help="discard partial results of an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


DESCRIPTION = (
    "Run a classifier over IMAGES (class subfolders, like ImageNet's train/) with its global pooling removed and "
    "its classifier applied at every position, keep the top-k logits per position, and write the label store STORE. "
    "Resumable: finished blocks of images are kept in STORE.partial/ and a re-run (with any number of ranks) does "
    "only the rest. Several GPUs or nodes: launch it with torchrun, e.g. `torchrun --nproc-per-node 8 --no-python "
    "tl-fast annotate ...` (or `torchrun ... -m tl_fast.annotate ...`); every rank annotates its share and rank 0 "
    "writes the one store.")


def register(subparsers) -> None:
    """Add ``tl-fast annotate``."""
    p = subparsers.add_parser("annotate", help="run a classifier densely over an image folder and write a label store",
                              description=DESCRIPTION)
    add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    """``python -m tl_fast.annotate IMAGES STORE ...``."""
    p = argparse.ArgumentParser(prog="python -m tl_fast.annotate", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    return args.func(args)
