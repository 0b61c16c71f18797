#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then trains the demo's CPU-sized LV-ViT twice on the built-in demo data,
# side by side through the DALI pipeline: with token labels, and as the class-token baseline with hard labels
# (python -m tl_fast.demo.compare). It ends with both top-1s, the gain and the throughput ratio, and writes
# runs/demo/curves.png and runs/demo/summary.json. First use generates the dataset, trains the demo annotator
# and writes its label store (about 8 minutes, cached under ${TL_FAST_DATA:-~/.cache/tl_fast/demo-v2}).
# Extra arguments go to the comparison, e.g. `bash scripts/demo.sh --seed 1` or `--no-baseline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tl_fast.demo.compare "$@"
