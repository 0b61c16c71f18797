"""The class-token-only mode: targets ``[B, K]`` and their loss for models without token outputs.

The reference (``tl_fast.ops.reference.class_targets``) must be row 0 of the reference token targets
exactly, and agree with torchvision's RoI-Align path; the targets kernel's class-row path
(``tl_fast/kernels/token_targets.py``, in Triton's interpreter without CUDA) and the loss from the maps must
agree with the reference on fresh random inputs; the loader's ``label_mode="class"`` gives maps without a MixToken box unless asked.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.baselines import public_token_targets  # noqa: E402
from tl_fast import geometry, ops  # noqa: E402
from tl_fast.ops import reference  # noqa: E402
from tl_fast.plan import AugmentConfig, RandAugmentConfig, draw_mix_box, plan_batch  # noqa: E402
from test_kernels import _kernel_modules, random_maps  # noqa: E402


# The kernels in the mode this process needs, reloaded (with their shared _rows helpers) if needed.
KC, _ = _kernel_modules()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def crop_flip(bsz, seed):
    sizes = np.stack([np.full(bsz, 300), np.full(bsz, 420)], 1)
    plan = plan_batch(seed, 0, np.arange(bsz), sizes, AugmentConfig(randaugment=None, scale=(0.02, 1.0)))
    return plan, torch.as_tensor(plan.affine, dtype=torch.float32, device=DEV)


def rotated(bsz, seed):
    """RandAugment plans (rotation, shear, translation composed into the affines), float64."""
    sizes = np.stack([np.full(bsz, 333), np.full(bsz, 256)], 1)
    plan = plan_batch(seed, 1, np.arange(bsz), sizes, AugmentConfig(randaugment=RandAugmentConfig(num_layers=3,
                                                                                                   prob=1.0)))
    a = plan.affine.copy()
    a[0] = geometry.compose(a[:1], geometry.rotate(np.array([31.0])))[0]  # at least one rotation for sure
    return torch.as_tensor(a, dtype=torch.float64, device=DEV)


def edge():
    """A sub-pixel crop (widened), a flipped sub-pixel crop, a crop sticking out of the map, a rotation."""
    boxes = torch.tensor([[0.40, 0.30, 0.41, 0.305], [0.70, 0.10, 0.71, 0.90], [-0.3, 0.6, 0.5, 1.4],
                          [0.2, 0.2, 0.8, 0.8]], dtype=torch.float64)
    a = geometry.crop_flip_affine(boxes, torch.tensor([False, True, True, False])).numpy()
    a[3] = geometry.compose(a[3:4], geometry.rotate(np.array([23.0])))[0]
    return torch.as_tensor(a, dtype=torch.float32, device=DEV)


def per_sample_boxes(bsz, grid, seed):
    return draw_mix_box(seed, 0, np.arange(bsz), grid).tensor(DEV)


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("box", ["none", "batch", "per_sample"])
@pytest.mark.parametrize("geo", ["crop_flip", "rotated"])
def test_reference_class_targets_are_row_zero_of_token_targets(box, geo):
    bsz, grid, num_classes = 6, (3, 4), 29
    values, indices = random_maps(bsz, 3, 9, 7, num_classes, seed=11)
    affine = crop_flip(bsz, 2)[1] if geo == "crop_flip" else rotated(bsz, 3)
    mix = {"none": None, "batch": (0, 1, 2, 4), "per_sample": per_sample_boxes(bsz, grid, 5)}[box]
    kw = dict(num_classes=num_classes, grid=grid, smoothing=0.1, mix_box=mix)
    cls = reference.class_targets(values, indices, affine, **kw)
    assert cls.shape == (bsz, num_classes) and cls.dtype == torch.float32
    assert torch.equal(cls, reference.token_targets(values, indices, affine, **kw)[:, 0])
    assert torch.allclose(cls.sum(-1), torch.ones(bsz, device=DEV, dtype=torch.float32), atol=1e-6)


def test_reference_class_targets_match_torchvision_roi_align():
    bsz, num_classes, grid = 7, 40, (4, 4)
    values, indices = random_maps(bsz, 5, 15, 15, num_classes, seed=4)
    plan, affine = crop_flip(bsz, 9)
    assert plan.flip.any() and not plan.flip.all()
    boxes = torch.as_tensor(plan.box, dtype=torch.float64, device=DEV)
    flip = torch.as_tensor(plan.flip, device=DEV)
    mix = per_sample_boxes(bsz, grid, 1)
    want = public_token_targets(values, indices, boxes, flip, num_classes=num_classes, grid=grid, smoothing=0.1,
                                mix_box=mix)[:, 0]
    got = reference.class_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=0.1,
                                  mix_box=mix)
    assert (got - want).abs().max().item() < 2e-6


# ----------------------------------------------------------------------------------------------
# Triton kernel against the reference
# ----------------------------------------------------------------------------------------------

CASES = {
    # name: (bsz, k, h, w, K, geometry, box, smoothing, distinct ids)
    "odd_K_crop_flip_batch_box": (5, 3, 7, 7, 37, "crop_flip", "batch", 0.1, True),
    "rotated_per_sample_boxes": (6, 5, 15, 15, 101, "rotated", "per_sample", 0.1, True),
    "edge_geometry_nonsquare_map": (4, 2, 5, 8, 23, "edge", "tensor4", 0.05, True),
    "K_is_1": (3, 1, 4, 6, 1, "crop_flip", "batch", 0.1, True),
    "K_below_k_repeated_ids_B1": (1, 4, 4, 4, 3, "rotated", "per_sample", 0.0, False),
    "many_lanes_K_over_block": (2, 5, 40, 40, 1500, "crop_flip", "none", 0.2, True),
}


def _case(name):
    bsz, k, h, w, num_classes, geo, box, smoothing, distinct = CASES[name]
    values, indices = random_maps(bsz, k, h, w, num_classes, seed=len(name), distinct=distinct)
    affine = {"crop_flip": lambda: crop_flip(bsz, 3)[1], "rotated": lambda: rotated(bsz, 4), "edge": edge}[geo]()
    grid = (3, 5)
    mix = {"none": None, "batch": (1, 0, 3, 2), "per_sample": per_sample_boxes(bsz, grid, 7),
           "tensor4": torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEV)}[box]
    return values, indices, affine, dict(num_classes=num_classes, grid=grid, smoothing=smoothing, mix_box=mix)


def _cpu(kw):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("out_dtype,atol", [(torch.float32, 2e-6), (torch.bfloat16, 8e-3)], ids=["f32", "bf16"])
def test_kernel_targets_match_reference(name, out_dtype, atol):
    values, indices, affine, kw = _case(name)
    got = KC.class_targets(values, indices, affine, out_dtype=out_dtype, **kw)
    want = reference.class_targets(values.cpu(), indices.cpu(), affine.cpu(), **_cpu(kw))
    assert got.shape == want.shape and got.dtype == out_dtype
    err = (got.cpu().float() - want).abs().max().item()
    assert err <= atol, f"max |triton - reference| = {err:.3g}"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)], ids=["f32", "bf16"])
def test_loss_from_maps_matches_reference_value_and_gradient(name, dtype, atol):
    values, indices, affine, kw = _case(name)
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(values.shape[0], kw["num_classes"], generator=gen) * 3).to(dtype)
    upstream = 2.5  # a non-unit incoming gradient
    z1 = base.clone().to(DEV).requires_grad_()
    loss = ops.class_token_loss(z1, maps=(values, indices), affine=affine, impl="triton", **kw)
    (upstream * loss).backward()
    z2 = base.float().requires_grad_()  # the same (bf16-representable) logits, float32 throughout
    targets = reference.class_targets(values.cpu(), indices.cpu(), affine.cpu(), **_cpu(kw))
    want = reference.class_token_loss(z2, targets)
    (upstream * want).backward()
    assert loss.dtype == torch.float32 and z1.grad.dtype == dtype
    assert abs(loss.item() - want.item()) <= atol * max(1.0, abs(want.item()))
    # float32 accumulation, one conversion to the logits' dtype at the end: within one bf16 ulp
    # (2^-7 relative; Triton's interpreter truncates where the GPU rounds to nearest)
    rel = 0.0 if dtype == torch.float32 else 2.0 ** -7
    err = (z1.grad.cpu().float() - z2.grad).abs() - rel * z2.grad.abs()
    assert err.max().item() <= 1e-6


def test_ops_dispatch_triton_equals_torch():
    values, indices, affine, kw = _case("rotated_per_sample_boxes")
    maps = (values, indices)
    for impl in ("triton", "torch"):
        assert ops.class_targets(values, indices, affine, impl=impl, **kw).shape == (6, 101)
    t_tri = ops.class_targets(values, indices, affine, impl="triton", **kw)
    t_ref = ops.class_targets(values, indices, affine, impl="torch", **kw)
    assert (t_tri - t_ref).abs().max().item() < 2e-6
    z = torch.randn(6, 101, device=DEV)
    loss = {impl: ops.class_token_loss(z, maps=maps, affine=affine, impl=impl, **kw) for impl in ("triton", "torch")}
    assert abs(loss["triton"].item() - loss["torch"].item()) < 1e-5
    assert torch.allclose(ops.class_token_loss(z, t_ref), loss["torch"])


def test_kernel_poisons_rows_with_bad_class_ids():
    values, indices = random_maps(3, 2, 5, 5, 10, seed=2)
    indices = indices.clone()
    indices[1, 0, 2, 2] = 10  # out of range: row 1 becomes NaN, no out-of-bounds write
    affine = geometry.crop_flip_affine(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3, dtype=torch.float64),
                                       torch.zeros(3, dtype=torch.bool)).float().to(DEV)
    out = KC.class_targets(values, indices, affine, num_classes=10)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


# ----------------------------------------------------------------------------------------------
# Batch and loader
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from test_loader_helpers import make_folder, make_store

    root = tmp_path_factory.mktemp("classonly")
    images = make_folder(root / "images")
    return {"images": images, "store": make_store(images, root / "labels.tls", topk=2)}


def _loader(data, **kw):
    from tl_fast.loaders import TokenLabelLoader

    return TokenLabelLoader(data["images"], data["store"], backend="torch", batch_size=4, image_size=32,
                            patch_size=8, num_workers=0, device="cpu", **kw)


def test_class_mode_loader_gives_maps_without_a_mix_box_unless_asked(data):
    plain = next(iter(_loader(data, label_mode="class")))
    assert plain.maps is not None and plain.mix_box is None
    asked = next(iter(_loader(data, label_mode="class", mixtoken=True, mixtoken_per_sample=True)))
    assert asked.mix_box is not None and asked.mix_box.shape == (4, 4)
    tokens = next(iter(_loader(data)))  # label_mode="tokens": MixToken on by default, as before
    assert tokens.mix_box is not None
    with pytest.raises(ValueError, match="label_mode"):
        _loader(data, label_mode="cls")


@pytest.mark.parametrize("mixtoken", [False, True])
def test_batch_loss_without_token_logits_is_the_class_target_cross_entropy(data, mixtoken):
    b = next(iter(_loader(data, label_mode="class", mixtoken=mixtoken, mixtoken_per_sample=True, seed=1)))
    k = b.num_classes
    cls = b.class_targets()
    assert cls.shape == (len(b), k)
    assert torch.equal(cls, b.token_targets()[:, 0])
    z = torch.randn(len(b), k)
    expected = -(cls * z.log_softmax(-1)).sum(-1).mean()
    for fused in (True, False):
        assert torch.allclose(b.loss(z, fused=fused), expected, atol=1e-6)
    assert torch.allclose(b.loss(z, cls_weight=0.5), 0.5 * expected, atol=1e-6)
