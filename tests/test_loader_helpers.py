"""Small image folders and label stores for the loader tests (imported by tests/test_loader*.py)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_folder(root, counts=None, *, seed: int = 0, size_range=(40, 96), quality: int = 95, smooth: bool = True) -> str:
    """``root/<class>/<i>.jpg`` with random sizes; ``smooth`` images compress well and survive JPEG."""
    counts = counts or {"cat": 4, "dog": 4, "owl": 4}
    rs = np.random.RandomState(seed)
    for c, n in counts.items():
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            h, w = rs.randint(*size_range, size=2)
            if smooth:
                coarse = rs.randint(0, 256, size=(4, 4, 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.Resampling.BICUBIC))
            else:
                img = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, c, f"{i:03d}.jpg"), quality=quality)
    return str(root)


def coordinate_image(h: int, w: int) -> np.ndarray:
    """RGB image whose red channel is the pixel's column, green its row (h, w <= 256)."""
    assert h <= 256 and w <= 256
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    img[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    img[..., 2] = 128
    return img


def make_store(images_root, path, *, num_classes=None, topk: int = 3, map_size=(6, 6), seed: int = 0,
               drop=()) -> str:
    """A store with a random top-k map for every image under ``images_root`` (except keys in ``drop``)."""
    from tl_fast.dataset import ImageFolderIndex
    from tl_fast.store import StoreWriter

    index = ImageFolderIndex(images_root, progress=False)
    k_classes = num_classes or index.num_classes
    topk = min(topk, k_classes)
    rs = np.random.RandomState(seed)
    with StoreWriter(path, num_classes=k_classes, topk=topk, map_size=map_size) as w:
        for key, cls in zip(index.keys, index.targets):
            if key in drop:
                continue
            values = np.sort(rs.rand(topk, *map_size).astype(np.float16) * 5, axis=0)[::-1].copy()
            ids = np.stack([rs.permutation(k_classes)[:topk] for _ in range(map_size[0] * map_size[1])], -1)
            w.add(key, values, ids.reshape(topk, *map_size))
    return str(path)


def exploding_ffcv_op(message: str = "exploding transform"):
    """An FFCV pipeline operation that raises ``ValueError(message)`` on its first batch (plain
    Python, not compiled): for the tests that a pipeline failure surfaces instead of hanging."""
    from dataclasses import replace

    from ffcv.pipeline.operation import Operation

    class Boom(Operation):
        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False), None

        def generate_code(self):
            def boom(images, dst):
                raise ValueError(message)
            return boom

    return Boom()
