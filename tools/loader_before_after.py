"""Loader throughput of two checkouts of tl_fast (before and after a change), interleaved.

    python -m tools.loader_before_after --old /path/to/old/checkout --new . --pairs 4 -- \\
        --images DIR --labels STORE --batch-size 32 --workers 2 --rounds 1 --batches 16

Each pair runs the loader benchmark (the options after ``--``) once from each checkout,
in alternating order, each process importing its own checkout's ``tl_fast``; each side keeps its own
work folder (a ``.beton`` format may differ between the two). Reported per backend and labels on/off:
the median images/s of each side and the median over pairs of new / old (the two runs of a pair are
back to back, so a drift of the machine's speed cancels out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(checkout: Path, workdir: Path, passthrough: list[str], out_json: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    if (checkout / "benchmarks" / "__init__.py").is_file():  # a package since the tree's restructuring
        bench = ["-m", "benchmarks.loader_throughput", "--no-record"]
    else:
        bench = [str(checkout / "benchmarks" / "loader_throughput.py")]
    cmd = [sys.executable, *bench, *passthrough, "--workdir", str(workdir), "--json", str(out_json)]
    subprocess.run(cmd, check=True, env=env, cwd=checkout, stdout=subprocess.DEVNULL)
    return json.loads(out_json.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="checkout of the code before the change")
    p.add_argument("--new", default=".", help="checkout of the code after the change")
    p.add_argument("--pairs", type=int, default=4, help="runs of each side (alternating which goes first)")
    p.add_argument("--json", help="write every run's figures here")
    args = p.parse_args(own)
    sides = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    tmp = Path(tempfile.mkdtemp(prefix="tl_fast_before_after_"))
    work = {side: tmp / side for side in sides}
    for w in work.values():
        w.mkdir()
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.pairs):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for side in order:
            runs[side].append(run_once(sides[side], work[side], passthrough, tmp / f"{side}_{i}.json"))
            print(f"pair {i + 1}/{args.pairs}: {side} done", flush=True)
    backends = list(runs["new"][0]["backends"])
    print(f"\nloader images/s, median of {args.pairs} runs per side ({' '.join(passthrough)})")
    print(f"{'backend':<8} {'labels':<7} {'old':>9} {'new':>9} {'new/old (paired)':>17}")
    table = {}
    for be in backends:
        for labels in ("off", "on"):
            old = [r["backends"][be][labels][0] for r in runs["old"]]
            new = [r["backends"][be][labels][0] for r in runs["new"]]
            ratio = statistics.median(n / o for n, o in zip(new, old))
            table[f"{be}/{labels}"] = {"old": old, "new": new, "paired_new_over_old": ratio}
            print(f"{be:<8} {labels:<7} {statistics.median(old):9.1f} {statistics.median(new):9.1f} {ratio:17.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"old": str(sides["old"]), "new": str(sides["new"]),
                                               "passthrough": passthrough, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
