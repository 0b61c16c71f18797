#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the whole test suite on CPU.
# Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1); GPU-only tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
# --tb=native: CPython 3.11.7 can crash pytest's source-based tracebacks ("AST constructor recursion
# depth mismatch") after numba compiled code; native tracebacks avoid re-parsing sources.
exec .venv/bin/python -m pytest -q -ra --tb=native "$@"
