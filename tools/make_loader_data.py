#!/usr/bin/env python
"""Data for ``benchmarks.loader_throughput`` on a machine without the demo: ImageNet-sized JPEGs
and a label store for them, generated locally (nothing to download or carry).

* images: the demo's procedural scenes (``tl_fast.demo.scenes.render_scene``) at ImageNet-like
  sizes (sides 300-500 px, JPEG quality 90), ``OUT/imgs/<class>/<class>_<i>.jpg``, rendered by a
  process pool;
* labels: ``OUT/labels.tls``, annotator-like synthetic top-k maps (``benchmarks.synthetic``) over
  the 32 classes, one record per image. Their values do not matter to the loader's speed, only their
  size (k and the map side; 18 x 18 top-5 as NFNet-F6's ImageNet maps by default).

    python -m tools.make_loader_data OUT --images 4096
"""
from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from tl_fast.demo.scenes import SceneConfig, class_specs, render_scene

SCENE = SceneConfig(min_side=300, max_side=500)
NUM_CLASSES = 32


def _render(job: tuple[int, int, int, str]) -> str:
    """Writes one scene; ``job`` = (seed, label, index, path)."""
    seed, label, index, path = job
    data = render_scene(seed, "train", label, index, class_specs(NUM_CLASSES), SCENE)
    Path(path).write_bytes(data)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (imgs/ and labels.tls are created in it)")
    p.add_argument("--images", type=int, default=4096, help="number of JPEGs (spread over 32 classes)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--map-size", type=int, default=18)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from benchmarks.synthetic import synthetic_topk_maps
    from tl_fast.store import StoreWriter

    out = Path(args.out)
    names = [s.name for s in class_specs(NUM_CLASSES)]
    jobs = []
    for i in range(args.images):
        label, index = i % NUM_CLASSES, i // NUM_CLASSES
        folder = out / "imgs" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((args.seed, label, index, str(folder / f"{names[label]}_{index:05d}.jpg")))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for _ in tqdm(pool.map(_render, jobs, chunksize=16), total=len(jobs), desc="render JPEGs", unit="img"):
            pass
    values, indices = synthetic_topk_maps(len(jobs), num_classes=NUM_CLASSES, topk=args.topk,
                                          map_size=(args.map_size, args.map_size), kind="smooth", seed=args.seed)
    with StoreWriter(out / "labels.tls", num_classes=NUM_CLASSES, topk=args.topk,
                     map_size=(args.map_size, args.map_size)) as writer:
        for (_, label, index, _), v, k in zip(jobs, values, indices):
            writer.add(f"{names[label]}/{names[label]}_{index:05d}", v, k)
    mb = sum(os.path.getsize(j[3]) for j in jobs) / 1e6
    print(f"{len(jobs)} JPEGs ({mb:.0f} MB) and {out / 'labels.tls'} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
