"""The FFCV decoder writes each batch into the backend's own tensor, as CHW, flipped by the plan and
normalized on the CPU (issue 19): bit for bit what FFCV's buffer holds with the same plan, and what
``augment_batch``'s normalization makes of the uint8 batch."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from test_loader_helpers import make_folder, make_store
from tl_fast.loaders import TokenLabelLoader
from tl_fast.plan import AugmentConfig

pytest.importorskip("ffcv")


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    from tl_fast.loaders.ffcv_pack import pack_ffcv

    root = tmp_path_factory.mktemp("ffcvnorm")
    images = make_folder(root / "imgs", {"a": 5, "b": 4, "c": 4}, size_range=(40, 200), smooth=False, quality=90)
    store = make_store(images, root / "l.tls")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_ffcv(images, store, str(root / "t.beton"), num_workers=1, progress=False)
    return str(root / "t.beton")


@pytest.mark.parametrize("mode", ["crop-flip-erase", "eval", "randaugment"])
def test_normalized_output_matches_augment_batchs_normalization(beton, mode):
    kw = {"crop-flip-erase": dict(augment=AugmentConfig(randaugment=None)), "eval": dict(train=False),
          "randaugment": dict()}[mode]
    loaders = [TokenLabelLoader(beton, None, backend="ffcv", batch_size=5, image_size=32, patch_size=8,
                                num_workers=1, device="cpu", seed=4, drop_last=False, **kw) for _ in range(2)]
    assert loaders[0]._backend.normalizes == (mode != "randaugment")  # RandAugment needs uint8 levels
    loaders[1]._backend.normalizes = False  # uint8 out, normalized by augment_batch
    normalized, levels = list(loaders[0]), list(loaders[1])
    assert [len(b) for b in normalized] == [5, 5, 3]
    for a, b in zip(normalized, levels):
        assert np.array_equal(a.indices, b.indices)
        assert a.images.dtype == torch.float32 and a.images.is_contiguous()
        assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("normalized", [False, True])
def test_direct_output_is_ffcvs_buffer_as_chw(beton, normalized):
    """The decoder's write into a batch tensor (address columns) against its write into FFCV's own
    buffer (no address: HWC, flipped in place, as FFCV operations after it expect), same plans."""
    from ffcv.loader import OrderOption

    from tl_fast.loaders.ffcv import (PlanCropDecoder, PlanRGBImageField, _GuardedLoader, add_plan_columns,
                                      read_packed, write_plan)
    from tl_fast.loaders.ffcv.output import batch_output, normalize_table

    size, n = 24, 13
    rng = np.random.default_rng(5)
    table = normalize_table()
    sizes = read_packed(beton).sizes  # random crops inside each image, random flips
    assert len(sizes) == n
    tops = rng.integers(0, sizes[:, 0] // 2)
    lefts = rng.integers(0, sizes[:, 1] // 2)
    crops = np.stack([tops, lefts, rng.integers(1, sizes[:, 0] - tops + 1), rng.integers(1, sizes[:, 1] - lefts + 1)],
                     axis=1).astype(np.int64)
    flips = rng.integers(0, 2, n).astype(np.uint8)
    assert flips.any() and not flips.all()

    def epoch(direct: bool) -> list:
        loader = _GuardedLoader(beton, batch_size=4, num_workers=2, order=OrderOption.SEQUENTIAL,
                                pipelines={"image": [PlanCropDecoder(size, table if direct and normalized else None)],
                                           "label": None, "index": None, "record": None},
                                custom_fields={"image": PlanRGBImageField}, drop_last=False)
        columns = add_plan_columns(loader)
        outputs = {}

        def before_batch(b_ix, ids):
            ids = np.asarray(ids, np.int64)
            rows = None
            if direct:
                outputs[b_ix], rows = batch_output(len(ids), size, normalized, pin=False)
            write_plan(columns, ids, crops[ids], flips[ids], rows)

        loader.before_batch = before_batch
        got = []
        for b_ix, (images,) in enumerate(loader):
            got.append(outputs.pop(b_ix) if direct else torch.from_numpy(images.copy()))
        return got

    for hwc, chw in zip(epoch(direct=False), epoch(direct=True)):
        want = hwc.permute(0, 3, 1, 2)
        if normalized:
            levels = torch.from_numpy(table)
            want = torch.stack([levels[c][want[:, c].long()] for c in range(3)], dim=1)
        assert chw.is_contiguous() and chw.dtype == want.dtype
        assert torch.equal(chw, want)
