"""Device-side augmentation vs per-image references (PIL, as timm applies them)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from tl_fast import augment, geometry
from tl_fast.augment import erase
from tl_fast.plan import RA_OPS, AugmentConfig, plan_batch, with_erase


def _images(n=4, h=37, w=45, seed=0) -> np.ndarray:
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        coarse = rs.randint(0, 256, size=(5, 5, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int64)
        img = img + rs.randint(-20, 21, size=img.shape)  # texture, so equalize/sharpness have work to do
        if i == n - 1:
            img = img // 4 + 60  # low contrast: auto-contrast stretches it
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * 3)


REFERENCES = {
    "AutoContrast": lambda im, lv: ImageOps.autocontrast(im),
    "Equalize": lambda im, lv: ImageOps.equalize(im),
    "Invert": lambda im, lv: ImageOps.invert(im),
    "PosterizeIncreasing": lambda im, lv: ImageOps.posterize(im, int(lv)),
    "SolarizeIncreasing": lambda im, lv: ImageOps.solarize(im, int(lv)),
    "SolarizeAdd": lambda im, lv: _solarize_add(im, int(lv)),
    "ColorIncreasing": lambda im, lv: ImageEnhance.Color(im).enhance(lv),
    "ContrastIncreasing": lambda im, lv: ImageEnhance.Contrast(im).enhance(lv),
    "BrightnessIncreasing": lambda im, lv: ImageEnhance.Brightness(im).enhance(lv),
    "SharpnessIncreasing": lambda im, lv: ImageEnhance.Sharpness(im).enhance(lv),
}
LEVELS = {
    "AutoContrast": [0], "Equalize": [0], "Invert": [0], "PosterizeIncreasing": [1, 2, 4],
    "SolarizeIncreasing": [64, 128, 200], "SolarizeAdd": [30, 99], "ColorIncreasing": [0.2, 1.0, 1.8],
    "ContrastIncreasing": [0.3, 1.6], "BrightnessIncreasing": [0.4, 1.7], "SharpnessIncreasing": [0.1, 1.9],
}


@pytest.mark.parametrize("name", augment.PHOTOMETRIC_OPS)
def test_photometric_ops_match_pil(name):
    imgs = _images()
    for level in LEVELS[name]:
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
        out = augment.PHOTOMETRIC[name](x.clone(), torch.full((len(x),), float(level)))
        got = out.permute(0, 2, 3, 1).numpy()
        for b in range(len(imgs)):
            ref = np.asarray(REFERENCES[name](Image.fromarray(imgs[b]), level)).astype(np.float64)
            diff = np.abs(got[b] - ref)
            # Same integer semantics as PIL: at most one level off (float rounding at .5 boundaries),
            # and almost everywhere exact.
            assert diff.max() <= 1.0, (name, level, b, diff.max())
            assert (diff > 0).mean() < 0.01, (name, level, b, (diff > 0).mean())


def test_apply_photometric_follows_plan_per_sample():
    imgs = torch.from_numpy(_images(n=3)).permute(0, 3, 1, 2).float()
    op = np.array([[RA_OPS.index("Invert"), -1], [-1, RA_OPS.index("SolarizeIncreasing")], [-1, -1]])
    level = np.array([[0.0, 0.0], [0.0, 100.0], [0.0, 0.0]])
    out = augment.apply_photometric(imgs.clone(), op, level)
    assert torch.equal(out[0], 255 - imgs[0])
    assert torch.equal(out[1], torch.where(imgs[1] >= 100, 255 - imgs[1], imgs[1]))
    assert torch.equal(out[2], imgs[2])


@pytest.mark.parametrize("run", range(3))
def test_apply_photometric_batched_equals_per_sample(run):
    """The batched path (samples grouped by op and layer, one host-to-device copy) against applying
    each sample's ops one by one, on fresh images and a fresh plan's ops and levels every run."""
    from tl_fast.plan import RandAugmentConfig

    n = 12
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    imgs = torch.from_numpy(rng.integers(0, 256, (n, 3, 20, 24)).astype(np.float32))
    sizes = np.tile(np.array([[40, 50]]), (n, 1))
    config = AugmentConfig(randaugment=RandAugmentConfig.parse("rand-m9-mstd0.5-inc1"))
    plan = plan_batch(seed, 0, np.arange(n), sizes, config)
    photometric = {RA_OPS.index(name) for name in augment.PHOTOMETRIC_OPS}
    assert any(o in photometric for o in plan.ra_op.ravel())
    expected = imgs.clone()
    for b in range(n):
        for j in range(plan.ra_op.shape[1]):
            op = int(plan.ra_op[b, j])
            if op in photometric:
                level = torch.tensor([plan.ra_level[b, j]], dtype=torch.float32)
                expected[b:b + 1] = augment.PHOTOMETRIC[RA_OPS[op]](expected[b:b + 1], level)
    out = augment.apply_photometric(imgs.clone(), plan.ra_op, plan.ra_level)
    assert torch.equal(out, expected)


def test_warp_lands_where_affine_says():
    """A linear ramp image warped by an affine: output pixel (i, j) shows the source coordinate
    ``A((j + .5) / S, (i + .5) / S) * size - 0.5`` (bilinear reproduces linear functions exactly)."""
    s = 48
    ramp = torch.zeros(1, 3, s, s)
    ramp[0, 0] = torch.arange(s).view(1, s).float()  # x
    ramp[0, 1] = torch.arange(s).view(s, 1).float()  # y
    a = geometry.compose(geometry.rotate(np.array([12.0])), geometry.shear_x(np.array([0.1])))
    a = geometry.compose(a, geometry.translate(np.array([0.05]), np.array([-0.04])))
    out = augment.warp(ramp * 4, torch.from_numpy(a).float(), fill=(0, 0, 0))[0] / 4  # x4: rounding error 1/8
    ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    u, v = (jj + 0.5) / s, (ii + 0.5) / s
    x, y = geometry.apply_affine(torch.from_numpy(a).float(), u[None], v[None])
    ex, ey = x[0] * s - 0.5, y[0] * s - 0.5
    inside = (ex > 1) & (ex < s - 2) & (ey > 1) & (ey < s - 2)
    assert inside.float().mean() > 0.6
    assert (out[0][inside] - ex[inside]).abs().max() < 0.2
    assert (out[1][inside] - ey[inside]).abs().max() < 0.2
    # Outside the source the fill colour shows.
    fill = augment.warp(ramp, torch.from_numpy(a).float(), fill=(7, 9, 11))[0]
    far = (ex < -2) | (ey < -2) | (ex > s + 1) | (ey > s + 1)
    assert far.any() and (fill[2][far] == 11).all()


def test_warp_matches_pil_rotate():
    img = _images(n=1, h=40, w=40)[0]
    deg = 17.0
    ref = np.asarray(Image.fromarray(img).rotate(deg, resample=Image.Resampling.BILINEAR, fillcolor=augment.FILL))
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    got = augment.warp(x, torch.from_numpy(geometry.rotate(np.array([deg]))).float())[0].permute(1, 2, 0).numpy()
    inner = np.s_[6:-6, 6:-6]
    assert np.abs(got[inner] - ref[inner]).mean() < 2.0


def test_grid_sample_theta_identity_and_flip():
    ident = torch.from_numpy(geometry.identity(1)).float()
    assert torch.allclose(augment.grid_sample_theta(ident), ident)
    flip = torch.from_numpy(geometry.crop_flip_affine_np(np.array([[0, 0, 1, 1.0]]), np.array([True]))).float()
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert torch.equal(augment.warp(x, flip, fill=(0,)), x.flip(-1))


def test_erase_boxes_follow_timm_rules():
    n, size = 4000, (32, 40)
    boxes = augment.erase_boxes(3, 1, np.arange(n), size)
    erased = boxes[:, 2] > 0
    assert 0.22 < erased.mean() < 0.28  # p = 0.25
    top, left, h, w = boxes[erased].T
    area = h * w / float(size[0] * size[1])
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size[0]).all() and (left + w <= size[1]).all()
    assert (h < size[0]).all() and (w < size[1]).all()
    assert area.min() > 0.01 and area.max() < 0.36  # 2%..1/3 up to rounding of h and w
    aspect = h / w
    assert aspect.min() > 0.2 and aspect.max() < 4.5
    # Keyed by sample index: a sample's box does not depend on the batch it is in.
    again = augment.erase_boxes(3, 1, np.arange(n)[::-1], size)[::-1]
    assert np.array_equal(boxes, again)


def test_random_erase_fills_box_with_noise_only():
    x = torch.zeros(3, 3, 20, 20)
    boxes = np.array([[2, 3, 5, 6], [0, 0, 0, 0], [10, 10, 4, 4]])
    out = augment.random_erase(x.clone(), boxes, noise_seed=5)
    assert (out[0, :, 2:7, 3:9] != 0).all()
    outside = out[0].clone()
    outside[:, 2:7, 3:9] = 0
    assert (outside == 0).all()
    assert abs(float(out[0, :, 2:7, 3:9].std()) - 1.0) < 0.3
    assert (out[1] == 0).all()
    assert (out[2, :, 10:14, 10:14] != 0).all()
    assert torch.equal(out, augment.random_erase(x.clone(), boxes, noise_seed=5))


def test_random_erase_cpu_and_gpu_strategies_agree():
    """The per-box copies (CPU) and the batched masks (GPU) fill the same pixels with the same noise."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(6, 3, 24, 20)).astype(np.float32))
    boxes = augment.erase_boxes(0, 0, np.arange(6), (24, 20))
    boxes[1] = (0, 0, 24, 20)  # a whole image
    boxes[2] = 0  # none
    sel = np.flatnonzero(boxes[:, 2] > 0)
    noise = torch.randn(int((boxes[sel, 2] * boxes[sel, 3]).sum()) * 3)
    by_copies = erase._erase_by_copies(x.clone(), boxes, sel, noise)
    by_mask = erase._erase_by_mask(x.clone(), boxes, sel, noise)
    assert torch.equal(by_copies, by_mask) and not torch.equal(by_copies, x)


def test_augment_batch_deterministic_and_normalized():
    imgs = torch.from_numpy(_images(n=8, h=32, w=32)).permute(0, 3, 1, 2).contiguous()
    plan = plan_batch(0, 2, np.arange(8), np.full((8, 2), 32), AugmentConfig())
    a = augment.augment_batch(imgs, with_erase(plan, 0, (32, 32)))
    b = augment.augment_batch(imgs, with_erase(plan, 0, (32, 32)))
    assert a.dtype == torch.float32 and a.shape == (8, 3, 32, 32)
    assert torch.equal(a, b)
    no_ra = plan_batch(0, 2, np.arange(8), np.full((8, 2), 32), AugmentConfig(randaugment=None))
    c = augment.augment_batch(imgs, no_ra)
    mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(c, (imgs.float() / 255 - mean) / std, atol=1e-5)


def test_cpu_opencv_warp_within_one_level_of_grid_sample():
    """The CPU path (OpenCV ``warpAffine`` on uint8) against :func:`augment.warp` on the plan's
    RandAugment affines, fresh random images: within one level everywhere, and almost always equal."""
    pytest.importorskip("cv2")
    rs = np.random.RandomState(np.random.SeedSequence().generate_state(1)[0])  # fresh inputs every run
    n, s = 24, 56
    plan = plan_batch(int(rs.randint(1 << 30)), 0, np.arange(200), np.full((200, 2), 80), AugmentConfig())
    geo = np.flatnonzero(np.isin(plan.ra_op, augment.GEOMETRIC_IDS).any(1))[:n]
    imgs = torch.from_numpy(_images(n=len(geo), h=s, w=s, seed=int(rs.randint(1000)))).permute(0, 3, 1, 2).contiguous()
    got = augment.warp_uint8_cv2(imgs, plan.ra_affine[geo])
    ref = augment.warp(imgs.float(), torch.from_numpy(plan.ra_affine[geo]).float())
    diff = (got.float() - ref).abs()
    assert got.dtype == torch.uint8 and diff.max() <= 1
    assert (diff > 0).float().mean() < 0.02
