"""The ``tl-fast`` command: token-labeling training and the data it needs.

Each subcommand lives beside the code it drives and registers itself through a ``register(sub)``
function; this file only collects them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .optional import MissingDependency

# Modules that define ``register(subparsers)``. Listed here so ``tl-fast --help`` shows them all.
COMMAND_MODULES = (
    "tl_fast.store.commands",  # convert-pt, inspect
    "tl_fast.annotate",  # annotate
    "tl_fast.demo.commands",  # demo prepare
    "tl_fast.loaders.ffcv_pack",  # pack-ffcv
    "tl_fast.dataset",  # check
    "tl_fast.store.fingerprint",  # fingerprint
    "tl_fast.train.commands",  # train, plot
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-fast",
        description="Token-labeling training and its data: convert public label maps, run a machine annotator, "
        "pack FFCV files, check images, inspect stores, build the built-in demo dataset, train, plot a run.",
    )
    parser.add_argument("--version", action="version", version=f"tl-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            # Skip a command whose own module is absent; surface a missing dependency inside it.
            if err.name is None or not (name == err.name or name.startswith(err.name + ".")):
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MissingDependency as err:  # an optional extra (DALI, FFCV, matplotlib) is not installed
        print(f"tl-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
