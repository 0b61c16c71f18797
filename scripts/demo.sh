#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then trains a CPU-sized LV-ViT with token labeling on the built-in
# demo dataset through the DALI pipeline. First use generates the dataset, trains the demo annotator and
# writes its label store (a few minutes, cached under ${TL_FAST_DATA:-~/.cache/tl_fast/demo}).
# Extra arguments go to the trainer, e.g. `bash scripts/demo.sh --loader ffcv --epochs 2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/train_lvvit.py --loader dali "$@"
