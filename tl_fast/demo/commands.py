"""``tl-fast demo prepare [--data DIR]``: build the built-in demo dataset (images, annotator, store);
``tl-fast demo compare``: token labeling against the hard-label baseline on it (:mod:`.compare`)."""
from __future__ import annotations

import argparse
import sys


def _prepare_cmd(args: argparse.Namespace) -> int:
    from . import prepare

    try:
        paths = prepare(args.data, progress=not args.no_progress)
    except RuntimeError as err:
        print(f"tl-fast demo prepare: error: {err}", file=sys.stderr)
        return 1
    m = paths.manifest
    ann, lab = m["annotator"], m["labels"]
    h, w = lab["map_size"]
    print(f"demo data in {paths.root}")
    print(f"  images     {paths.train} ({m['num_train']}), {paths.val} ({m['num_val']}); "
          f"{paths.num_classes} classes")
    print(f"  annotator  {paths.annotator} (val top-1 {100 * ann['val_top1']:.1f}%)")
    print(f"  labels     {paths.labels} (top-{lab['topk']} of K={lab['num_classes']} on {h}x{w} maps, "
          f"{lab['bytes'] / 2**20:.2f} MiB)")
    return 0


def register(subparsers) -> None:
    """Add ``tl-fast demo prepare`` and ``tl-fast demo compare``."""
    p = subparsers.add_parser("demo", help="the built-in demo dataset",
                              description="The built-in demo dataset: generated scenes in ImageNet layout, a "
                              "small trained annotator and its label store.")
    sub = p.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    q = sub.add_parser("prepare", help="generate images, train the annotator and write the label store (once)",
                       description="Generate the demo images, train the demo annotator and annotate the train "
                       "split into a label store. Idempotent: a second call only checks what is there.")
    q.add_argument("--data", help="directory for the demo data (default: $TL_FAST_DATA or ~/.cache/tl_fast/demo-v2)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=_prepare_cmd)
    from . import compare
    c = sub.add_parser("compare", help="train token labeling and the hard-label baseline side by side; one picture",
                       description=compare.DESCRIPTION, epilog=compare.EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_arguments(c)
    c.set_defaults(func=_compare_cmd)


def _compare_cmd(args: argparse.Namespace) -> int:
    from .compare import run
    run(args)
    return 0
