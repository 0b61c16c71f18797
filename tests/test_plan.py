"""The geometry plan: pure, keyed by (seed, epoch, index, size), and faithful to torchvision/timm/PIL."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tl_fast import geometry, plan, rng


def torchvision_rrc_scalar(height, width, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, line by line, with its random draws replaced by ``u``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + u[attempt, 0] * (scale[1] - scale[0]))
        aspect_ratio = math.exp(log_ratio[0] + u[attempt, 1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[attempt, 2] * (height - h + 1))
            j = int(u[attempt, 3] * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_rrc_matches_torchvision_rule():
    sizes = np.array([[375, 500], [500, 375], [20, 900], [900, 20], [1, 1], [224, 224], [7, 3]] * 30)
    idx = np.arange(len(sizes))
    got = plan.random_resized_crop(0, 2, idx, sizes)
    u = rng.uniform(0, 2, idx, rng.Stream.CROP, 40).reshape(-1, 10, 4)
    for n, (h, w) in enumerate(sizes):
        assert tuple(got[n]) == torchvision_rrc_scalar(int(h), int(w), u[n]), n


@settings(max_examples=50, deadline=None)
@given(h=st.integers(1, 2000), w=st.integers(1, 2000), seed=st.integers(0, 2**40), epoch=st.integers(0, 500),
       index=st.integers(0, 2**31))
def test_property_plan_boxes_valid(h, w, seed, epoch, index):
    p = plan.plan_batch(seed, epoch, [index], [[h, w]])
    top, left, ch, cw = p.crop[0]
    assert 0 <= top and 0 <= left and ch >= 1 and cw >= 1 and top + ch <= h and left + cw <= w
    x1, y1, x2, y2 = p.box[0]
    assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
    # Without RandAugment geometry the affine sends the output corners to the box corners.
    a = geometry.crop_flip_affine_np(p.box, p.flip)[0]
    corner = a @ np.array([0.0, 0.0, 1.0])
    assert np.allclose(corner, [x2 if p.flip[0] else x1, y1])


def test_plan_is_pure_function_of_key():
    sizes = np.array([[300, 400], [500, 200], [256, 256], [100, 640]])
    a = plan.plan_batch(1, 3, [10, 11, 12, 13], sizes)
    b = plan.plan_batch(1, 3, [13, 12], sizes[[3, 2]])  # other batch composition, other order
    np.testing.assert_array_equal(a.crop[[3, 2]], b.crop)
    np.testing.assert_array_equal(a.affine[[3, 2]], b.affine)
    np.testing.assert_array_equal(a.ra_op[[3, 2]], b.ra_op)
    c = plan.plan_batch(1, 4, [10, 11, 12, 13], sizes)
    assert not np.array_equal(a.crop, c.crop)
    # Same result in a fresh interpreter (no hidden global state, no hash randomization).
    code = ("import numpy as np; from tl_fast import plan; "
            "p = plan.plan_batch(1, 3, [10, 11, 12, 13], np.array([[300,400],[500,200],[256,256],[100,640]])); "
            "print(p.affine.tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == a.affine.tobytes().hex()


def test_plan_statistics_look_like_the_recipe():
    n = 4000
    p = plan.plan_batch(0, 0, np.arange(n), np.tile([[400, 400]], (n, 1)))
    area = (p.crop[:, 2] * p.crop[:, 3]) / (400 * 400)
    assert 0.07 < area.min() and area.max() <= 1.0
    assert abs(p.flip.mean() - 0.5) < 0.04
    applied = p.ra_op >= 0
    assert abs(applied.mean() - 0.5) < 0.04
    counts = np.bincount(p.ra_op[applied], minlength=len(plan.RA_OPS))
    assert counts.min() > 0.5 * counts.mean()
    rot = p.ra_level[p.ra_op == plan.RA_OPS.index("Rotate")]
    assert np.abs(rot).max() <= 30.0 and (rot > 0).any() and (rot < 0).any()


def test_randaugment_spec_parsing():
    cfg = plan.RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")
    assert (cfg.magnitude, cfg.magnitude_std, cfg.num_layers) == (9.0, 0.5, 2)
    assert plan.RandAugmentConfig.parse("rand-m7-n3-mstd0-inc1").num_layers == 3
    with pytest.raises(ValueError):
        plan.RandAugmentConfig.parse("auto-m9")


def _coordinate_image(size: int) -> Image.Image:
    """Each pixel stores its own column in R and row in G."""
    yy, xx = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([xx, yy, np.full_like(xx, 255)], -1).astype(np.uint8))


@pytest.mark.parametrize("op,arg", [("rotate", 17.0), ("rotate", -30.0), ("shear_x", 0.25), ("shear_y", -0.2),
                                    ("translate_x", 0.3), ("translate_y", -0.2)])
def test_randaugment_geometry_matches_pil(op, arg):
    """Our output -> input maps agree with timm's PIL operations to within a pixel."""
    size = 200
    img = _coordinate_image(size)
    nearest = Image.Resampling.NEAREST
    if op == "rotate":
        out, a = img.rotate(arg, resample=nearest), geometry.rotate(np.array(arg))
    elif op == "shear_x":
        out, a = img.transform(img.size, Image.Transform.AFFINE, (1, arg, 0, 0, 1, 0), nearest), geometry.shear_x(np.array(arg))
    elif op == "shear_y":
        out, a = img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, arg, 1, 0), nearest), geometry.shear_y(np.array(arg))
    elif op == "translate_x":
        out = img.transform(img.size, Image.Transform.AFFINE, (1, 0, arg * size, 0, 1, 0), nearest)
        a = geometry.translate(np.array(arg), np.array(0.0))
    else:
        out = img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, arg * size), nearest)
        a = geometry.translate(np.array(0.0), np.array(arg))
    arr = np.asarray(out).astype(np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    u, v = (xx + 0.5) / size, (yy + 0.5) / size
    x = (a[0, 0] * u + a[0, 1] * v + a[0, 2]) * size - 0.5
    y = (a[1, 0] * u + a[1, 1] * v + a[1, 2]) * size - 0.5
    valid = (arr[..., 2] == 255) & (x > 1) & (y > 1) & (x < size - 2) & (y < size - 2)
    assert valid.mean() > 0.3
    assert np.abs(arr[..., 0][valid] - x[valid]).max() <= 1.0
    assert np.abs(arr[..., 1][valid] - y[valid]).max() <= 1.0


def test_mix_box_recipe():
    boxes = plan.draw_mix_box(0, 0, np.arange(2000), (14, 14))
    r1, c1, r2, c2 = boxes.boxes.T
    assert ((0 <= r1) & (r1 <= r2) & (r2 <= 14) & (0 <= c1) & (c1 <= c2) & (c2 <= 14)).all()
    np.testing.assert_allclose(boxes.lam, 1 - (r2 - r1) * (c2 - c1) / 196)
    assert 0.3 < boxes.lam.mean() < 0.8
    again = plan.draw_mix_box(0, 0, [5], (14, 14))
    np.testing.assert_array_equal(again.boxes[0], boxes.boxes[5])


def test_center_crop_plan_and_errors():
    p = plan.center_crop_plan([0, 1], [[400, 300], [300, 300]])
    np.testing.assert_array_equal(p.crop[1], [19, 19, 262, 262])
    assert not p.flip.any()
    with pytest.raises(ValueError, match="sizes"):
        plan.plan_batch(0, 0, [0, 1], [[10, 10]])
    with pytest.raises(ValueError, match="positive"):
        plan.plan_batch(0, 0, [0], [[0, 10]])


def test_crop_flip_affine_tensor_api():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    a = geometry.crop_flip_affine(boxes, torch.tensor([True, False]))
    assert a.shape == (2, 2, 3) and a.dtype == torch.float32
    x, y = geometry.apply_affine(a, torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [0.5]]))
    torch.testing.assert_close(x, torch.tensor([[0.5], [1.0]]))
    torch.testing.assert_close(y, torch.tensor([[0.9], [0.5]]))
