"""DALI backend: an external source feeds JPEG bytes with the plan's crop windows; DALI decodes only
the window (``fn.decoders.image_slice``; ``device="mixed"`` — nvJPEG on the GPU — when the loader's
device is CUDA, ``"cpu"`` with ``device_id=None`` otherwise), resizes to S (antialiased bilinear),
flips and lays out CHW (``fn.crop_mirror_normalize``), normalizing too when no RandAugment pixel
operation has to see uint8 levels on the device.

One pipeline is built per epoch (or resumed part of one) over exactly that epoch's batches of this
rank, so the source never has to guess which epoch DALI's prefetching is asking for. The images
come out of ``pipe.run()`` in the thread that drives the pipeline; the batch's label records are
decoded right there, by sample id, straight into the batch's map buffer (one batched store read,
``LabelStore.read(..., out=)``, pinned for a GPU).
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np
import torch

from ..augment import IMAGENET_MEAN, IMAGENET_STD
from ..optional import require
from .batch import LoaderConfig
from .common import EpochPlans, StoreMaps, empty_maps


def _import_dali():
    require("nvidia.dali", "backend='dali'")
    from nvidia.dali import fn, pipeline_def, types

    return fn, pipeline_def, types


class _EpochSource:
    """DALI external source (batch mode): batch ``info.iteration`` of the epoch's plans, or
    ``StopIteration`` past its end. Yields JPEG bytes, pixel anchors (x, y), shapes (w, h), mirror
    flags and sample ids."""

    def __init__(self, paths: Sequence[str], plans: EpochPlans) -> None:
        self.paths = paths
        self.plans = plans

    def __call__(self, info):
        i = info.iteration
        if i >= len(self.plans):
            raise StopIteration
        plan = self.plans[i]
        idx = plan.index
        jpegs, anchors, shapes, mirror, ids = [], [], [], [], []
        for b, j in enumerate(idx):
            try:
                jpegs.append(np.fromfile(self.paths[j], dtype=np.uint8))
            except OSError as err:
                raise RuntimeError(f"cannot read image {self.paths[j]}: {err}") from err
            top, left, h, w = (float(v) for v in plan.crop[b])
            anchors.append(np.array([left, top], dtype=np.float32))
            shapes.append(np.array([w, h], dtype=np.float32))
            mirror.append(np.array(int(plan.flip[b]), dtype=np.int32))
            ids.append(np.array(j, dtype=np.int64))
        return jpegs, anchors, shapes, mirror, ids


class DALIBackend:
    name = "dali"

    def __init__(self, paths: Sequence[str], sizes: np.ndarray, config: LoaderConfig, device: torch.device, *,
                 normalize: bool, labels: StoreMaps | None = None) -> None:
        _import_dali()
        self.paths = list(paths)
        self.labels = labels
        self.config = config
        self.device = device
        self.normalizes = normalize
        self.gpu = device.type == "cuda"

    def _build(self, source: _EpochSource, batch: int):
        fn, pipeline_def, types = _import_dali()
        cfg = self.config
        size = cfg.image_size
        gpu = self.gpu
        normalize = self.normalizes

        @pipeline_def
        def graph():
            jpegs, anchor, shape, mirror, ids = fn.external_source(
                source=source, num_outputs=5, batch=True, batch_info=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT64])
            images = fn.decoders.image_slice(
                jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False, axis_names="WH",
                device="mixed" if gpu else "cpu", output_type=types.RGB,
                # The plan, the index and the other backends take the stored pixel grid as is.
                adjust_orientation=False)
            images = fn.resize(images, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)
            if normalize:
                images = fn.crop_mirror_normalize(
                    images, mirror=mirror, output_layout="CHW", dtype=types.FLOAT,
                    mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])
            else:
                images = fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.UINT8)
            return images, ids

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = graph(batch_size=batch, num_threads=max(1, int(cfg.num_workers)), device_id=device_id,
                     prefetch_queue_depth=2, seed=cfg.seed & 0x7FFFFFFF)
        pipe.build()
        return pipe

    def _to_torch(self, out) -> torch.Tensor:
        tensor = out.as_tensor()
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dtype = torch.float32 if self.normalizes else torch.uint8
            dest = torch.empty(tensor.shape(), dtype=dtype, device=self.device)
            feed_ndarray(tensor, dest, cuda_stream=torch.cuda.current_stream(self.device))
            return dest
        return torch.from_numpy(np.array(tensor))

    def iterate(self, plans: EpochPlans) -> Iterator[tuple[torch.Tensor, np.ndarray, dict]]:
        batches = plans.batches
        if not batches:
            return
        source = _EpochSource(self.paths, plans)
        pipe = self._build(source, max(len(b) for b in batches))
        try:
            for step in range(len(batches)):
                try:
                    images, ids = pipe.run()
                except StopIteration:
                    raise RuntimeError("DALI pipeline ended before the epoch's last batch") from None
                except RuntimeError as err:
                    raise self._explain(err, batches[step:step + 3]) from err
                idx = np.array(ids.as_tensor()).reshape(-1).astype(np.int64)
                yield self._to_torch(images), idx, self._labels(idx)
        finally:
            del pipe

    def _labels(self, idx: np.ndarray) -> dict:
        """The batch's maps (when it has token labels), read into a fresh buffer beside its images."""
        if self.labels is None:
            return {}
        t0 = time.perf_counter()
        maps = self.labels(idx, out=empty_maps(self.labels.parts(len(idx)), pin=self.gpu))
        return {"maps": maps, "label_s": time.perf_counter() - t0}

    def _explain(self, err: RuntimeError, suspects: Sequence[np.ndarray]) -> RuntimeError:
        """DALI's decoder errors do not name the file ("nvImageCodec failure: '#4'"): find it by
        checking the images of the failed batch and of those DALI may have prefetched."""
        from ..imagecheck import check_image

        said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        for idx in suspects:
            for j in np.asarray(idx, dtype=np.int64):
                verdict = check_image(self.paths[j], full=True)
                if verdict.problem:
                    return RuntimeError(f"DALI failed on image {self.paths[j]}: {verdict.problem} (the file changed "
                                        f"after indexing?); DALI said: {said}")
        first = self.paths[int(np.asarray(suspects[0])[0])] if len(suspects) and len(suspects[0]) else "?"
        return RuntimeError(f"DALI pipeline failed on a batch starting at {first} (every image of it decodes "
                            f"elsewhere): {said}")
