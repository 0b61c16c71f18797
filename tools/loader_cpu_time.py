#!/usr/bin/env python
"""CPU seconds per batch of one loader: all threads of this process, the torch backend's work in the
main process (``num_workers=0``), FFCV and DALI on one thread.

Steadier than wall time on a shared host (another session's work delays this one but does not add
to its CPU time), so a before/after comparison of loader code can be run there; run it for the old
and the new tree alternately.

    python -m tools.loader_cpu_time torch --images DIR --labels STORE
    python -m tools.loader_cpu_time ffcv --images TRAIN.beton          # without token labels
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402

from tl_fast.loaders import TokenLabelLoader  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backend", choices=["torch", "dali", "ffcv"])
    p.add_argument("--images", required=True, help="ImageFolder directory (a .beton for ffcv)")
    p.add_argument("--labels", help="label store of the images (default: none, without token labels)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = TokenLabelLoader(args.images, args.labels, backend=args.backend,
                                  batch_size=args.batch_size, image_size=args.image_size,
                                  num_workers=0 if args.backend == "torch" else 1, device="cpu", seed=0)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    cpu, wall, n = time.process_time(), time.perf_counter(), 0
    for _ in it:
        n += 1
    print(f"{args.backend} labels={'on' if args.labels else 'off'} cpu_ms/batch "
          f"{1e3 * (time.process_time() - cpu) / n:.1f} wall_ms/batch {1e3 * (time.perf_counter() - wall) / n:.1f} "
          f"batches={n}")


if __name__ == "__main__":
    main()
