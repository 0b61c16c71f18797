"""tl_fast's product benchmarks, run from the repository root as modules:
``python -m benchmarks.label_throughput`` (``--help`` on each). Each measures against its baseline in
the same run and records its rows in ``benchmarks/results/<benchmark>.json`` (:mod:`benchmarks.harness`);
BENCHMARKS.md is drawn from those files. Not part of the installed package."""
