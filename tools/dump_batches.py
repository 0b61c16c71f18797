#!/usr/bin/env python
"""Dump a few batches of every backend to one ``.pt`` file, and compare two dumps bit for bit.

A refactor of the loader must not change its batches: run this with the old code and the new on the
same data and seed, then ``--compare``. Each configuration turns on what draws at random
(RandAugment, random erasing, MixToken per batch or per sample), plus evaluation batches and a
resume in the middle of an epoch. The data is a small generated image folder, a label store for it
and a ``.beton`` packed from both (made once under ``--data``, then reused, so both runs read the
same files).

    python -m tools.dump_batches --data /tmp/dump_data --out new.pt
    python -m tools.dump_batches --compare old.pt new.pt

(A checkout from before the tools moved has it as ``benchmarks/dump_batches.py``; the dumps compare
all the same.)
"""
from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch

from tl_fast.plan import AugmentConfig

CONFIGS = {
    "recipe": {},  # timm's recipe (RandAugment), erasing, one MixToken box per batch
    "per_sample": {"mixtoken_per_sample": True, "smoothing": 0.0},
    "eval": {"train": False},
    "crop_flip": {"augment": AugmentConfig(randaugment=None)},  # the backends normalize themselves
}


def make_data(root: str) -> dict:
    """An image folder of random sizes, a store for it and a ``.beton`` of both, under ``root``."""
    from PIL import Image

    from tl_fast.dataset import ImageFolderIndex
    from tl_fast.store import StoreWriter

    images, store, beton = os.path.join(root, "images"), os.path.join(root, "labels.tls"), os.path.join(root, "x.beton")
    if not os.path.isdir(images):
        rs = np.random.RandomState(0)
        for c in ("cat", "dog", "owl"):
            os.makedirs(os.path.join(images, c))
            for i in range(12):
                h, w = rs.randint(40, 120, size=2)
                coarse = rs.randint(0, 256, size=(4, 4, 3)).astype(np.uint8)
                img = Image.fromarray(coarse).resize((int(w), int(h)), Image.Resampling.BICUBIC)
                img.save(os.path.join(images, c, f"{i:03d}.jpg"), quality=95)
    if not os.path.isfile(store):
        index = ImageFolderIndex(images, progress=False)
        rs = np.random.RandomState(1)
        with StoreWriter(store, num_classes=3, topk=3, map_size=(6, 6)) as w:
            for key in index.keys:
                values = np.sort(rs.rand(3, 6, 6).astype(np.float16) * 5, axis=0)[::-1].copy()
                ids = np.stack([rs.permutation(3) for _ in range(36)], -1).reshape(3, 6, 6)
                w.add(key, values, ids)
    if not os.path.isfile(beton):
        from tl_fast.loaders.ffcv_pack import pack_ffcv

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pack_ffcv(images, store, beton, num_workers=1, progress=False)
    return {"images": images, "store": store, "beton": beton}


def _batch_record(b) -> dict:
    """The batch's tensors as copies (a backend's tensors may be views of one shared buffer)."""
    def own(t):
        return None if t is None else t.detach().cpu().clone()

    return {"indices": torch.from_numpy(np.array(b.indices)), "images": own(b.images), "labels": own(b.labels),
            "affine": own(b.affine), "values": None if b.maps is None else own(b.maps.values),
            "map_ids": None if b.maps is None else own(b.maps.indices), "mix_box": own(b.mix_box)}


def dump(data: dict, backends: list[str], workers: int, epochs: int) -> dict:
    from tl_fast.loaders import TokenLabelLoader

    out = {}
    for backend in backends:
        for name, kw in CONFIGS.items():
            def make():
                source = data["beton"] if backend == "ffcv" else data["images"]
                return TokenLabelLoader(source, data["store"], backend=backend, batch_size=8, image_size=32,
                                        patch_size=8, seed=3, device="cpu",
                                        num_workers=workers if backend == "torch" else 1, **kw)

            loader = make()
            for epoch in range(epochs):
                for step, b in enumerate(loader):
                    out[f"{backend}/{name}/e{epoch}/s{step}"] = _batch_record(b)
            resumed = make()  # epoch 1 from its second batch
            resumed.load_state_dict({**resumed.state_dict(), "epoch": 1, "step": 1})
            for step, b in enumerate(resumed, start=1):
                out[f"{backend}/{name}/resume/s{step}"] = _batch_record(b)
            print(f"{backend}/{name}: {len(loader)} batches x {epochs} epochs", flush=True)
    return out


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        for field, x in a[key].items():
            y = b[key][field]
            same = (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                                 and x.shape == y.shape and torch.equal(x, y))
            if not same:
                bad.append(f"{key}:{field}")
    print(f"{len(set(a) & set(b))} batches in both, {len(bad)} differences" + (": " + ", ".join(bad[:20]) if bad else ""))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/tl_fast_dump_data", help="folder of the generated data (made once)")
    p.add_argument("--out", help="the .pt file to write")
    p.add_argument("--backends", default="torch,dali,ffcv")
    p.add_argument("--workers", type=int, default=2, help="torch backend workers (0: in the main process)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two dumps instead")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("--out is required (or --compare A B)")
    os.makedirs(args.data, exist_ok=True)
    torch.save(dump(make_data(args.data), args.backends.split(","), args.workers, args.epochs), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
