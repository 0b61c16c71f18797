"""The CPU table path of the device step against the float path it replaces (fresh inputs every run)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tl_fast import augment
from tl_fast.plan import RA_OPS, AugmentConfig, plan_batch, with_erase

cv2 = pytest.importorskip("cv2")
from tl_fast.augment.tables import augment_photometric_normalize  # noqa: E402


def _fresh_rng() -> tuple[np.random.Generator, int]:
    seed = int(np.random.SeedSequence().generate_state(1)[0])
    return np.random.default_rng(seed), seed


def _images(rng: np.random.Generator, n: int, s: int) -> torch.Tensor:
    """Noise, smooth gradients, low-contrast and single-level channels (the tables' edge cases)."""
    x = rng.integers(0, 256, (n, 3, s, s), dtype=np.uint8)
    ramp = np.linspace(0, 255, s, dtype=np.float64)
    x[n // 4: n // 2] = (ramp[None, None, :, None] * rng.uniform(0.2, 1, (n // 2 - n // 4, 3, 1, 1))).astype(np.uint8)
    x[n // 2: n // 2 + 3] = x[n // 2: n // 2 + 3] // 16 + 100  # low contrast
    x[n - 1, 1] = rng.integers(0, 256)  # one flat channel
    x[n - 2] = 0  # all black
    return torch.from_numpy(x)


def _levels(rng: np.random.Generator, op: np.ndarray) -> np.ndarray:
    """Levels in each operation's range, as the plan draws them (whole levels where PIL needs ints)."""
    level = rng.uniform(0.0, 2.0, op.shape)
    for name, hi in (("PosterizeIncreasing", 5), ("SolarizeIncreasing", 257), ("SolarizeAdd", 111)):
        sel = op == RA_OPS.index(name)
        level[sel] = rng.integers(0, hi, sel.sum())
    return level


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_tables_equal_float_path(layers):
    """Any sequence of operations (three or four in a row hit histogram after table, contrast after
    colour, ...) gives bit-identical normalized floats."""
    rng, seed = _fresh_rng()
    n, s = 48, int(rng.integers(8, 40))
    imgs = _images(rng, n, s)
    op = rng.integers(-1, len(RA_OPS), (n, layers))
    level = _levels(rng, op)
    want = augment.normalize(augment.apply_photometric(imgs.float(), op, level))
    got = augment_photometric_normalize(imgs, op, level)
    assert got.dtype == torch.float32 and got.shape == imgs.shape
    bad = (got != want).flatten(1).any(1).nonzero().flatten().tolist()
    assert not bad, f"seed {seed}: samples {bad} differ, ops {[op[b].tolist() for b in bad[:3]]}"


def test_tables_leave_input_untouched_and_take_replacements():
    rng, seed = _fresh_rng()
    imgs = _images(rng, 8, 16)
    before = imgs.clone()
    op = np.full((8, 2), RA_OPS.index("Equalize"))
    other = torch.from_numpy(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8))
    got = augment_photometric_normalize(imgs, op, np.zeros((8, 2)), replaced={3: other})
    assert torch.equal(imgs, before), f"seed {seed}"
    stand_in = imgs.clone()
    stand_in[3] = other
    assert torch.equal(got, augment.normalize(augment.apply_photometric(stand_in.float(), op, np.zeros((8, 2)))))


def test_augment_batch_cpu_is_warp_then_float_reference():
    """``augment_batch`` on uint8 CPU images equals the OpenCV warp followed by the float operations,
    normalization and erasing, for the plan's own draws."""
    rng, seed = _fresh_rng()
    n, s = 40, 32
    imgs = _images(rng, n, s)
    plan = plan_batch(seed % 1000, 3, np.arange(n), np.full((n, 2), 48), AugmentConfig())
    got = augment.augment_batch(imgs, with_erase(plan, 5, (s, s)))
    geo = np.flatnonzero(np.isin(plan.ra_op, augment.GEOMETRIC_IDS).any(1))
    x = imgs.clone()
    if len(geo):
        x[geo] = augment.warp_uint8_cv2(imgs[geo], plan.ra_affine[geo])
    want = augment.normalize(augment.apply_photometric(x.float(), plan.ra_op, plan.ra_level))
    boxes = augment.erase_boxes(5, 3, plan.index, (s, s))
    want = augment.random_erase(want, boxes, augment.noise_seed(5, 3, plan.index))
    assert torch.equal(got, want), f"seed {seed}"


def test_without_opencv_falls_back_to_the_float_path(monkeypatch):
    rng, seed = _fresh_rng()
    imgs = _images(rng, 16, 24)
    plan = plan_batch(seed % 1000, 0, np.arange(16), np.full((16, 2), 24), AugmentConfig())
    plan.ra_op[np.isin(plan.ra_op, augment.GEOMETRIC_IDS)] = -1  # no warp: both paths then agree exactly
    with_cv2 = augment.augment_batch(imgs, plan)
    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    assert augment_photometric_normalize(imgs, plan.ra_op, plan.ra_level) is None
    without = augment.augment_batch(imgs, plan)
    assert torch.equal(with_cv2, without), f"seed {seed}"
