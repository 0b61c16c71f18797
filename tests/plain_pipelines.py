"""Run in a fresh process by tests/test_ffcv_isolation.py: plain FFCV and DALI pipelines, alone or
built before, beside and after tl_fast loaders, with every batch saved for the test to compare.

    python tests/plain_pipelines.py plain|tl_fast|mixed WORKDIR OUT.npz

``WORKDIR`` holds ``images/`` (an ImageFolder), ``plain.beton`` (FFCV's own ``DatasetWriter``) and
``tl.beton`` (``tl-fast pack-ffcv``). ``plain``: the plain pipelines only, tl_fast never imported.
``tl_fast``: tl_fast's FFCV and DALI loaders only. ``mixed``: the plain FFCV loader built before the
tl_fast one and iterated after it (the hang of issue 27), one built beside it (iterated in turn with
it) and one after it; the plain DALI pipeline likewise; and the tl_fast loaders run again after a
plain FFCV loader has been built (FFCV's own manager mutates numba's shared types).
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np

SIZE = 32
BATCH = 4


def plain_ffcv(workdir: str):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    return Loader(os.path.join(workdir, "plain.beton"), batch_size=BATCH, num_workers=1, order=OrderOption.SEQUENTIAL,
                  drop_last=False, pipelines={"image": [CenterCropRGBImageDecoder((SIZE, SIZE), 1.0), ToTensor()],
                                              "label": [IntDecoder(), ToTensor()]})


def plain_dali(workdir: str):
    """DALI's own reader and decoder over the folder, in file order (deterministic)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=BATCH, num_threads=1, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=os.path.join(workdir, "images"), random_shuffle=False, name="Reader")
        images = fn.resize(fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), resize_x=SIZE, resize_y=SIZE)
        return images, labels

    p = pipe()
    p.build()
    return p


def dali_batches(pipe, n: int = 3) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        images, labels = pipe.run()
        out += [np.array(images.as_tensor()), np.array(labels.as_tensor())]
    return out


def tl_loader(workdir: str, backend: str):
    from tl_fast import TokenLabelLoader
    from tl_fast.plan import AugmentConfig

    images = os.path.join(workdir, "tl.beton") if backend == "ffcv" else os.path.join(workdir, "images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TokenLabelLoader(images, None, backend=backend, batch_size=BATCH, image_size=SIZE, patch_size=8,
                                num_workers=1, device="cpu", seed=3, augment=AugmentConfig(randaugment=None),
                                erase=None)


def tl_batches(loader) -> list[np.ndarray]:
    return [a for b in loader for a in (b.images.numpy().copy(), b.labels.numpy().copy())]


def ffcv_batches(it) -> list[np.ndarray]:
    return [a.numpy().copy() for batch in it for a in batch]


def main(mode: str, workdir: str, out: str) -> None:
    saved: dict[str, list[np.ndarray]] = {}
    if mode == "plain":
        saved["ffcv"] = ffcv_batches(plain_ffcv(workdir))
        saved["dali"] = dali_batches(plain_dali(workdir))
        assert "tl_fast" not in sys.modules
    elif mode == "tl_fast":
        for backend in ("ffcv", "dali"):
            loader = tl_loader(workdir, backend)
            saved[f"tl_{backend}"] = tl_batches(loader)  # epoch 0
            saved[f"tl_{backend}_beside"] = tl_batches(loader)  # epoch 1
    else:
        from ffcv.memory_managers import OSCacheManager
        from ffcv.memory_managers.os_cache import OSCacheContext

        ffcv_own = (OSCacheManager.__dict__["state_type"], OSCacheManager.__dict__["compile_reader"],
                    OSCacheContext.__dict__["state"])
        before = plain_ffcv(workdir)  # built before any tl_fast loader: mutates numba's uint8[::1]
        dali_before = plain_dali(workdir)
        tl_ffcv, tl_dali = tl_loader(workdir, "ffcv"), tl_loader(workdir, "dali")
        saved["tl_ffcv"], saved["tl_dali"] = tl_batches(tl_ffcv), tl_batches(tl_dali)
        saved["ffcv_before"] = ffcv_batches(before)
        saved["dali_before"] = dali_batches(dali_before)
        beside, dali_beside = plain_ffcv(workdir), plain_dali(workdir)
        saved["ffcv_beside"], saved["tl_ffcv_beside"], saved["dali_beside"], saved["tl_dali_beside"] = [], [], [], []
        for plain, tl_f, tl_d in zip(beside, tl_ffcv, tl_dali):  # one batch of each in turn
            saved["ffcv_beside"] += [a.numpy().copy() for a in plain]
            saved["tl_ffcv_beside"] += [tl_f.images.numpy().copy(), tl_f.labels.numpy().copy()]
            saved["dali_beside"] += dali_batches(dali_beside, 1)
            saved["tl_dali_beside"] += [tl_d.images.numpy().copy(), tl_d.labels.numpy().copy()]
        saved["ffcv_after"] = ffcv_batches(plain_ffcv(workdir))
        saved["dali_after"] = dali_batches(plain_dali(workdir))
        now = (OSCacheManager.__dict__["state_type"], OSCacheManager.__dict__["compile_reader"],
               OSCacheContext.__dict__["state"])
        if now != ffcv_own:
            raise SystemExit("FFCV's OSCacheManager / OSCacheContext were changed in this process")
    np.savez(out, **{f"{k}/{i}": a for k, arrays in saved.items() for i, a in enumerate(arrays)})


if __name__ == "__main__":
    main(*sys.argv[1:4])
