"""DALI backend: DALI's file reader reads the epoch's JPEGs in plan order, an external source feeds
the plan's crop windows and flips for the same batches; DALI decodes only the window
(``fn.decoders.image_slice``; ``device="mixed"`` — nvJPEG on the GPU — when the loader's device is
CUDA, ``"cpu"`` with ``device_id=None`` otherwise), resizes to S (antialiased bilinear), flips and
lays out CHW (``fn.crop_mirror_normalize``), normalizing too when no RandAugment pixel operation has
to see uint8 levels on the device.

One pipeline is built per epoch (or resumed part of one) over exactly that epoch's batches of this
rank: the reader's file list is those batches' files in order (no shuffling, each batch padded to
the pipeline's batch size), so batch ``i`` of the reader and of the external source are the same
samples, and the reader's labels (the sample ids) say which samples the images are. Files are read
in DALI's own reader thread, as in a native DALI pipeline, not in the training process. The images
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
    """DALI external source (batch mode): the plan of batch ``info.iteration`` of the epoch's plans,
    or ``StopIteration`` past its end. Yields pixel anchors (x, y), shapes (w, h) and mirror flags,
    each batch padded to ``size`` samples by repeating its last one (as the reader's file list is)."""

    def __init__(self, plans: EpochPlans, size: int) -> None:
        self.plans = plans
        self.size = size

    def __call__(self, info):
        i = info.iteration
        if i >= len(self.plans):
            raise StopIteration
        plan = self.plans[i]
        crop = _pad(np.asarray(plan.crop, dtype=np.float32).reshape(-1, 4), self.size)  # (top, left, h, w)
        flip = _pad(np.asarray(plan.flip).astype(np.int32).reshape(-1), self.size)
        # One array per output, its first axis the batch: (x, y) anchors, (w, h) shapes, flags.
        return np.ascontiguousarray(crop[:, [1, 0]]), np.ascontiguousarray(crop[:, [3, 2]]), flip


def _pad(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` with its last row repeated up to ``size`` rows."""
    if len(rows) >= size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def epoch_files(paths: Sequence[str], batches: Sequence[np.ndarray], size: int) -> tuple[list[str], list[int]]:
    """The reader's file list and labels (sample ids) for ``batches``: their samples in order, each
    batch padded to ``size`` by repeating its last sample."""
    files, ids = [], []
    for idx in batches:
        idx = _pad(np.asarray(idx, dtype=np.int64).reshape(-1), size)
        files.extend(paths[j] for j in idx)
        ids.extend(int(j) for j in idx)
    return files, ids


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

    def _build(self, source: _EpochSource, files: list[str], ids: list[int], batch: int):
        fn, pipeline_def, types = _import_dali()
        cfg = self.config
        size = cfg.image_size
        gpu = self.gpu
        normalize = self.normalizes

        @pipeline_def
        def graph():
            # The file list is the plan's order: no shuffling, and labels carry the sample ids.
            jpegs, sample_ids = fn.readers.file(files=files, labels=ids, random_shuffle=False, name="Reader")
            anchor, shape, mirror = fn.external_source(
                source=source, num_outputs=3, batch=True, batch_info=True,
                dtype=[types.FLOAT, types.FLOAT, types.INT32])
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
            return images, sample_ids

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = graph(batch_size=batch, num_threads=max(1, int(cfg.num_workers)), device_id=device_id,
                     prefetch_queue_depth=2, seed=cfg.seed & 0x7FFFFFFF)
        pipe.build()
        return pipe

    def _to_torch(self, out, shared: bool) -> torch.Tensor:
        """The batch as a torch tensor. ``shared``: DALI's dynamic executor hands out buffers it will
        not reuse while a consumer holds them, so the CPU batch is shared through DLPack (as DALI's
        own iterator does) instead of copied."""
        tensor = out.as_tensor()
        if not self.gpu and shared:
            return torch.from_dlpack(tensor)
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
        size = max(len(b) for b in batches)
        source = _EpochSource(plans, size)
        files, ids = epoch_files(self.paths, batches, size)
        pipe = self._build(source, files, ids, size)
        shared = bool(getattr(pipe, "exec_dynamic", False))
        try:
            for step in range(len(batches)):
                try:
                    images, sample_ids = pipe.run()
                except StopIteration:
                    raise RuntimeError("DALI pipeline ended before the epoch's last batch") from None
                except RuntimeError as err:
                    raise self._explain(err, batches[step:step + 3]) from err
                n = len(batches[step])  # the reader's padding is dropped here
                images = self._to_torch(images, shared)
                idx = np.array(sample_ids.as_tensor()).reshape(-1)[:n].astype(np.int64)
                yield images[:n], idx, self._labels(idx)
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
