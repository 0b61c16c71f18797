"""The DALI backend reads files with DALI's reader (issue 19): its batches are bit for bit those of
the earlier design, whose external source read every file in the training process."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from test_loader_helpers import make_folder
from tl_fast.augment import IMAGENET_MEAN, IMAGENET_STD
from tl_fast.loaders import TokenLabelLoader
from tl_fast.loaders.dali_backend import epoch_files
from tl_fast.plan import AugmentConfig

pytest.importorskip("nvidia.dali")


def _bytes_pipeline(paths, batch, plan, size: int, threads: int):
    """The earlier graph: JPEG bytes read with ``np.fromfile`` by the external source itself."""
    from nvidia.dali import fn, pipeline_def, types

    def source(info):
        if info.iteration >= len(batch):
            raise StopIteration
        idx = np.asarray(batch[info.iteration], np.int64)
        p = plan(idx)
        return ([np.fromfile(paths[j], np.uint8) for j in idx],
                [np.array([c[1], c[0]], np.float32) for c in p.crop], [np.array([c[3], c[2]], np.float32) for c in p.crop],
                [np.array(int(f), np.int32) for f in p.flip])

    @pipeline_def
    def graph():
        jpegs, anchor, shape, mirror = fn.external_source(source=source, num_outputs=4, batch=True, batch_info=True,
                                                          dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
        images = fn.decoders.image_slice(jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                         axis_names="WH", device="cpu", output_type=types.RGB, adjust_orientation=False)
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=True, interp_type=types.INTERP_LINEAR)
        return fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.FLOAT,
                                        mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])

    pipe = graph(batch_size=max(len(b) for b in batch), num_threads=threads, device_id=None, prefetch_queue_depth=2,
                 seed=0)
    pipe.build()
    for _ in batch:
        (out,) = pipe.run()
        yield torch.from_numpy(np.array(out.as_tensor()))


@pytest.mark.parametrize("mode", ["crop-flip", "eval"])
def test_dali_batches_match_the_in_process_reader(tmp_path, mode):
    root = make_folder(tmp_path / "imgs", {"a": 5, "b": 4, "c": 4}, size_range=(40, 200), smooth=False, quality=90)
    kw = dict(augment=AugmentConfig(randaugment=None), erase=None) if mode == "crop-flip" else dict(train=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = TokenLabelLoader(root, None, backend="dali", batch_size=5, image_size=40, patch_size=8, num_workers=2,
                                  device="cpu", seed=7, drop_last=False, **kw)
    loader.set_epoch(2)
    batches, plan = loader._batches(2), loader.plan_maker(2)
    got = list(loader)
    assert [len(b) for b in got] == [5, 5, 3]  # the short last batch: the reader's padding is dropped
    paths = loader._backend.paths
    for b, idx, ref in zip(got, batches, _bytes_pipeline(paths, batches, plan, 40, 2)):
        assert np.array_equal(b.indices, idx)
        assert torch.equal(b.images, ref)


def test_epoch_files_pad_each_batch_with_its_last_sample():
    paths = [f"p{i}" for i in range(10)]
    files, ids = epoch_files(paths, [np.array([3, 1, 4]), np.array([9])], 3)
    assert files == ["p3", "p1", "p4", "p9", "p9", "p9"] and ids == [3, 1, 4, 9, 9, 9]


def test_file_removed_after_indexing_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = TokenLabelLoader(root, None, backend="dali", batch_size=4, image_size=32, patch_size=8,
                                  num_workers=1, device="cpu")
    gone = tmp_path / "imgs" / "cat" / "001.jpg"
    gone.unlink()
    with pytest.raises(RuntimeError, match="001.jpg: unreadable file"):
        for _ in loader:
            pass
