"""The FFCV backend normalizes on the CPU in the pass that copies a batch out of FFCV's buffer
(issue 19): the images are bit for bit those of the earlier path (a uint8 CHW copy, then
``augment_batch``'s normalization)."""
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
def test_fused_normalization_matches_the_earlier_path(beton, mode):
    kw = {"crop-flip-erase": dict(augment=AugmentConfig(randaugment=None)), "eval": dict(train=False),
          "randaugment": dict()}[mode]
    loaders = [TokenLabelLoader(beton, None, backend="ffcv", batch_size=5, image_size=32, patch_size=8,
                                num_workers=1, device="cpu", seed=4, drop_last=False, **kw) for _ in range(2)]
    assert loaders[0]._backend.normalizes == (mode != "randaugment")  # RandAugment needs uint8 levels
    loaders[1]._backend.normalizes = False  # the earlier path
    fused, earlier = list(loaders[0]), list(loaders[1])
    assert [len(b) for b in fused] == [5, 5, 3]
    for a, b in zip(fused, earlier):
        assert np.array_equal(a.indices, b.indices)
        assert a.images.dtype == torch.float32 and a.images.is_contiguous()
        assert torch.equal(a.images, b.images)
