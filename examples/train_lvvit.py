#!/usr/bin/env python
"""Train LV-ViT with token labeling (or any timm classifier): the documented entry to ``tl-fast train``.

With no ``--data``, it trains a CPU-sized LV-ViT on the built-in demo dataset (generated, annotated
and stored on first use) so the whole path runs on a laptop. On ImageNet::

    torchrun --nproc_per_node 8 examples/train_lvvit.py --loader dali --data /imagenet \\
        --labels /imagenet/labels.tlstore --model lvvit_s

The trainer lives in :mod:`tl_fast.train` (``tl-fast train`` and ``python -m tl_fast.train`` take the
same options); ``--help`` lists them and the presets.
"""
from __future__ import annotations

import sys

from tl_fast.train.config import build_parser
from tl_fast.train.main import main

__all__ = ["main", "build_parser"]

if __name__ == "__main__":
    main()
    sys.exit(0)
