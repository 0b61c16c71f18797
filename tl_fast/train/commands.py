"""``tl-fast train`` and ``tl-fast plot``."""
from __future__ import annotations

from .config import DESCRIPTION, EPILOG, USAGE, _Help, add_arguments
from .plot import register as register_plot


def register(sub) -> None:
    p = sub.add_parser("train", help="train LV-ViT with token labeling, or any timm classifier",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=_Help, usage=USAGE)
    add_arguments(p)
    p.set_defaults(func=lambda args: _train(args, p))
    register_plot(sub)


def _train(args, parser) -> int:
    from .main import run_command
    del args.func, args.command
    run_command(args, parser)
    return 0
