"""Triton token-target and fused-loss kernels against the PyTorch reference (tl_fast.ops.reference).

Without CUDA the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here
before tl_fast.kernels is imported); with CUDA the same small cases run compiled on the GPU, and the
``cuda``-marked tests add full-size comparisons (B=128, K=1000, 18x18 top-5 maps, 14x14 grid).
Shapes stay small: the interpreter executes every program one after another in numpy.
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from tl_fast import geometry  # noqa: E402
from tl_fast import ops  # noqa: E402
from tl_fast.ops import reference  # noqa: E402
from tl_fast.plan import AugmentConfig, RandAugmentConfig, RA_GEOMETRIC, RA_OPS, draw_mix_box, plan_batch  # noqa: E402


def _kernel_modules():
    """Import the kernels in the mode this process needs (reloading if an earlier import differed)."""
    from tl_fast.kernels import _rows
    from tl_fast.kernels import token_label_loss as tll
    from tl_fast.kernels import token_targets as tt

    if tt.interpreted() == HAS_CUDA:
        importlib.reload(_rows)
        tt = importlib.reload(tt)
        tll = importlib.reload(tll)
    return tt, tll


TT, TLL = _kernel_modules()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def random_maps(bsz, k, h, w, num_classes, seed, *, distinct=True, idx_dtype=torch.int16):
    """Top-k maps: float16 scores, class ids distinct per position unless ``distinct=False``."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(bsz, k, h, w, generator=gen) * 2.5 + 1.0).half()
    if distinct:
        ids = torch.rand(bsz * h * w, num_classes, generator=gen).topk(k, dim=1).indices
        ids = ids.view(bsz, h, w, k).permute(0, 3, 1, 2)
    else:
        ids = torch.randint(0, num_classes, (bsz, k, h, w), generator=gen)
    return values.contiguous().to(DEV), ids.to(idx_dtype).contiguous().to(DEV)


def crop_flip_affine(bsz, seed):
    sizes = np.stack([np.full(bsz, 300), np.full(bsz, 420)], 1)
    plan = plan_batch(seed, 0, np.arange(bsz), sizes, AugmentConfig(randaugment=None, scale=(0.02, 1.0)))
    if bsz >= 5:
        assert plan.flip.any() and not plan.flip.all()
    return torch.as_tensor(plan.affine, dtype=torch.float32, device=DEV)


def randaugment_affine(bsz, seed):
    sizes = np.stack([np.full(bsz, 333), np.full(bsz, 256)], 1)
    cfg = AugmentConfig(randaugment=RandAugmentConfig(num_layers=3, prob=1.0))
    plan = plan_batch(seed, 1, np.arange(bsz), sizes, cfg)
    geometric = {i for i, name in enumerate(RA_OPS) if name in RA_GEOMETRIC}
    assert np.isin(plan.ra_op, list(geometric)).any(), "the test batch should carry RandAugment geometry"
    return torch.as_tensor(plan.affine, dtype=torch.float64, device=DEV)


def edge_affine():
    """Hand-made geometry: a sub-pixel crop (widened), a flipped sub-pixel crop, a crop sticking out of
    the map (border rule), and a rotation about the centre."""
    boxes = torch.tensor([[0.40, 0.30, 0.41, 0.305], [0.70, 0.10, 0.71, 0.90], [-0.3, 0.6, 0.5, 1.4],
                          [0.2, 0.2, 0.8, 0.8]], dtype=torch.float64)
    flip = torch.tensor([False, True, True, False])
    a = geometry.crop_flip_affine(boxes, flip).numpy()
    a[3] = geometry.compose(a[3:4], geometry.rotate(np.array([23.0])))[0]
    return torch.as_tensor(a, dtype=torch.float32, device=DEV)


def spread_affine():
    """Four crops whose tokens take 1x1, 2x1, 2x2 and 3x3 samples on 6x6 maps with a 3x3 grid:
    20, 40, 80 and 180 lanes at k = 5, i.e. 1, 3 and 5 chunks of the all-pairs pass (one block of
    128 lanes) and the long-row kernel (a crop sticking out of the map)."""
    boxes = torch.tensor([[0.1, 0.5, 0.5, 0.9], [0.1, 0.1, 0.9, 0.5], [0.2, 0.1, 1.0, 0.9], [-0.2, -0.2, 1.2, 1.2]],
                         dtype=torch.float64)
    return geometry.crop_flip_affine(boxes, torch.tensor([True, False, False, True])).float().to(DEV)


def full_affine(bsz):
    """Near-whole-image crops (alternately flipped): every token of a coarse grid has many samples."""
    boxes = torch.tensor([[0.02 * i, 0.01 * i, 1.0 - 0.01 * i, 1.0] for i in range(bsz)], dtype=torch.float64)
    return geometry.crop_flip_affine(boxes, torch.arange(bsz) % 2 == 1).float().to(DEV)


def ref_targets(values, indices, affine, **kw):
    return reference.token_targets(values.cpu(), indices.cpu(), affine.cpu(), **kw)


def assert_targets(values, indices, affine, *, atol=1e-5, **kw):
    got = TT.token_targets(values, indices, affine, **kw)
    want = ref_targets(values, indices, affine, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.cpu().float() - want.float()).abs().max().item()
    assert err <= atol, f"max |triton - reference| = {err:.3g} > {atol}"
    rows = got.float().sum(-1)
    assert torch.allclose(rows.cpu(), torch.ones_like(rows.cpu()), atol=max(atol * kw["num_classes"], 1e-4))
    return got


# ----------------------------------------------------------------------------------------------
# token targets
# ----------------------------------------------------------------------------------------------

def test_crop_flip_batch_mixtoken_smoothing():
    values, indices = random_maps(5, 3, 7, 7, 50, seed=1)
    assert_targets(values, indices, crop_flip_affine(5, seed=2), num_classes=50, grid=(4, 4),
                   smoothing=0.1, mix_box=(1, 0, 3, 2))


def test_randaugment_per_sample_mixtoken_nonsquare():
    bsz, grid = 4, (3, 5)
    values, indices = random_maps(bsz, 4, 6, 9, 61, seed=3)
    boxes = draw_mix_box(7, 0, np.arange(bsz), grid).tensor(DEV)
    assert boxes.shape == (bsz, 4)
    assert_targets(values, indices, randaugment_affine(bsz, seed=4), num_classes=61, grid=grid, mix_box=boxes)


def test_edge_geometry_widening_border_rotation():
    values, indices = random_maps(4, 2, 5, 8, 23, seed=5)
    assert_targets(values, indices, edge_affine(), num_classes=23, grid=(2, 3), smoothing=0.05,
                   mix_box=torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEV))


@pytest.mark.parametrize(
    "bsz,k,h,w,num_classes,grid,distinct",
    [
        (3, 1, 5, 3, 7, (1, 1), True),        # k = 1, grid 1x1 (every row on the general path)
        (1, 4, 4, 4, 3, (2, 3), False),      # K < k: every class touched, repeated ids in a pixel
        (3, 2, 6, 6, 33, (1, 2), True),      # tokens of 144 lanes: the long-row kernel
        (5, 3, 4, 6, 10, (5, 4), True),      # tokens smaller than a map pixel
    ],
)
def test_odd_shapes(bsz, k, h, w, num_classes, grid, distinct):
    values, indices = random_maps(bsz, k, h, w, num_classes, seed=bsz * 100 + k, distinct=distinct)
    if grid == (1, 2):
        affine = full_affine(bsz)
    else:
        affine = crop_flip_affine(bsz, seed=k) if bsz > 1 else edge_affine()[3:4]
    assert_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=0.2,
                   mix_box=(0, 0, 1, 1))


def test_bf16_output_int32_indices_wide_k():
    """K above one 2048-wide block, int32 class ids, bfloat16 rows."""
    values, indices = random_maps(3, 2, 5, 5, 2500, seed=9, idx_dtype=torch.int32)
    assert_targets(values, indices, crop_flip_affine(3, seed=9), num_classes=2500, grid=(2, 2),
                   smoothing=0.1, out_dtype=torch.bfloat16, atol=2e-3)


def test_launch_parameters_do_not_change_results():
    """Tile sizes and class-row splits (1 program, several, more than the row has lanes for)."""
    values, indices = random_maps(3, 3, 6, 6, 20, seed=11)
    affine = crop_flip_affine(3, seed=11)
    kw = dict(num_classes=20, grid=(3, 3), smoothing=0.1, mix_box=(0, 1, 2, 3))
    base = TT.token_targets(values, indices, affine, launch=TT.Launch(tile=1, class_split=1), **kw)
    for launch in (TT.Launch(tile=4, class_split=3, class_chunk=16), TT.Launch(tile=16, class_split=40, class_chunk=8)):
        torch.testing.assert_close(TT.token_targets(values, indices, affine, launch=launch, **kw), base,
                                   rtol=0, atol=1e-6)


def test_bad_class_id_poisons_rows_not_memory():
    values, indices = random_maps(2, 2, 4, 4, 9, seed=12)
    indices[1, 0, 2, 2] = 9  # == K: out of range
    out = TT.token_targets(values, indices, crop_flip_affine(2, seed=3), num_classes=9, grid=(2, 2))
    assert out.shape == (2, 5, 9)
    assert torch.isnan(out[1]).any()
    assert not torch.isnan(out[0]).any()  # sample 0 never reads sample 1's map (no MixToken)


def rotated_sheared_affine(bsz, seed):
    """Crops composed with a rotation and shears on both axes (each sample different)."""
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0.0, 0.3, bsz), rng.uniform(0.0, 0.3, bsz)
    side = rng.uniform(0.5, 0.7, bsz)
    boxes = torch.as_tensor(np.stack([x1, y1, x1 + side, y1 + side], 1))
    a = geometry.crop_flip_affine(boxes, torch.as_tensor(rng.random(bsz) < 0.5)).numpy()
    a = geometry.compose(a, geometry.rotate(rng.uniform(-30, 30, bsz)))
    a = geometry.compose(a, geometry.shear_x(rng.uniform(-0.3, 0.3, bsz)))
    a = geometry.compose(a, geometry.shear_y(rng.uniform(-0.3, 0.3, bsz)))
    return torch.as_tensor(a, dtype=torch.float32, device=DEV)


@pytest.mark.parametrize("num_classes,out_dtype,atol", [
    (1, torch.float32, 1e-6),       # K = 1: every row is [1.0]
    (3, torch.float32, 1e-5),       # every class touched in every row (K < k)
    (37, torch.float32, 1e-5),      # odd K: scalar stores
    (6, torch.bfloat16, 4e-3),      # K = 6: 2-wide vectors in bf16
    (40, torch.float16, 1e-3),      # f16 rows, 8-wide vectors
])
def test_small_and_odd_k(num_classes, out_dtype, atol):
    values, indices = random_maps(4, 4, 6, 6, num_classes, seed=num_classes, distinct=num_classes >= 4)
    assert_targets(values, indices, crop_flip_affine(4, seed=num_classes), num_classes=num_classes, grid=(3, 2),
                   smoothing=0.1, mix_box=(1, 0, 3, 1), out_dtype=out_dtype, atol=atol)


def test_large_k_f16_several_blocks():
    """K over several 1024-wide blocks (and not a multiple of the vector width), f16 rows."""
    values, indices = random_maps(2, 3, 5, 5, 2051, seed=31, idx_dtype=torch.int32)
    assert_targets(values, indices, crop_flip_affine(2, seed=31), num_classes=2051, grid=(2, 2),
                   smoothing=0.1, mix_box=(0, 1, 2, 2), out_dtype=torch.float16, atol=1e-3)


def test_every_lane_tier_and_long_rows_under_per_sample_boxes():
    """Tokens of 20 / 40 / 80 lanes (1, 3 and 5 chunks of the all-pairs pass) and 180 lanes (the
    long-row kernel), with per-sample boxes taking rows from partners on the other path."""
    values, indices = random_maps(4, 5, 6, 6, 100, seed=32)
    boxes = torch.tensor([[0, 0, 2, 1], [1, 1, 3, 3], [0, 0, 1, 3], [0, 0, 0, 0]], dtype=torch.int32, device=DEV)
    assert_targets(values, indices, spread_affine(), num_classes=100, grid=(3, 3), smoothing=0.1, mix_box=boxes)


def test_box_covering_the_whole_grid():
    """lam = 0: every token and the whole class target come from the partner (B odd: the middle
    sample is its own partner)."""
    values, indices = random_maps(5, 3, 7, 7, 30, seed=33)
    got = assert_targets(values, indices, crop_flip_affine(5, seed=33), num_classes=30, grid=(3, 4), smoothing=0.1,
                         mix_box=(0, 0, 3, 4))
    plain = TT.token_targets(values, indices, crop_flip_affine(5, seed=33), num_classes=30, grid=(3, 4), smoothing=0.1)
    torch.testing.assert_close(got, plain.flip(0), rtol=0, atol=1e-6)


def test_rotated_sheared_affines():
    values, indices = random_maps(4, 3, 9, 9, 45, seed=34)
    assert_targets(values, indices, rotated_sheared_affine(4, seed=34), num_classes=45, grid=(4, 4),
                   smoothing=0.1, mix_box=torch.tensor([[0, 0, 2, 2], [1, 1, 4, 3], [0, 2, 4, 4], [2, 0, 3, 4]],
                                                       dtype=torch.int64, device=DEV))


def test_nan_and_inf_scores_poison_as_the_reference():
    """NaN and +inf scores make every row that reads them NaN, -inf gives its class a zero share
    (softmax), as in the reference; rows that do not read them stay finite. All samples share one
    crop so that the reference pads no samples (its padding multiplies real scores by 0)."""
    bsz, num_classes = 4, 20
    values, indices = random_maps(bsz, 3, 6, 6, num_classes, seed=35)
    values[0, 1, 2, 3] = float("nan")
    values[1, 0, 4, 4] = float("inf")
    values[2, 2, 0, 5] = float("-inf")
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9]] * bsz, dtype=torch.float64)
    affine = geometry.crop_flip_affine(boxes, torch.tensor([False, True, False, True])).float().to(DEV)
    for mix in (None, (0, 0, 1, 2)):
        kw = dict(num_classes=num_classes, grid=(3, 3), smoothing=0.1, mix_box=mix)
        got = TT.token_targets(values, indices, affine, **kw).cpu()
        want = ref_targets(values, indices, affine, **kw)
        assert torch.isnan(want).any() and (~torch.isnan(want)).any()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# fused loss
# ----------------------------------------------------------------------------------------------

LOSS_CASES = [
    # bsz, k, h, w, K, grid, mix, dtype, grad scale
    (4, 3, 7, 7, 40, (3, 3), "batch", torch.float32, 1.0),
    (3, 2, 6, 9, 29, (2, 3), "sample", torch.float32, 2.0),   # loss * 2: non-unit upstream grad
    (5, 1, 8, 5, 17, (1, 1), None, torch.float32, 1.0),       # k = 1, grid 1x1, B odd
    (4, 4, 5, 5, 37, (2, 2), "batch", torch.bfloat16, 2.0),
]


def _mix(kind, bsz, grid):
    if kind == "batch":
        return tuple(int(x) for x in draw_mix_box(3, 0, [5], grid).boxes[0])
    if kind == "sample":
        return draw_mix_box(3, 0, np.arange(bsz), grid).tensor(DEV)
    return None


@pytest.mark.parametrize("bsz,k,h,w,num_classes,grid,mix,dtype,scale", LOSS_CASES)
def test_fused_loss_value_and_grads(bsz, k, h, w, num_classes, grid, mix, dtype, scale):
    values, indices = random_maps(bsz, k, h, w, num_classes, seed=bsz + 10 * k)
    affine = randaugment_affine(bsz, seed=k) if k % 2 else crop_flip_affine(bsz, seed=k)
    box = _mix(mix, bsz, grid)
    gen = torch.Generator().manual_seed(bsz * k)
    tokens = grid[0] * grid[1]
    cls = (torch.randn(bsz, num_classes, generator=gen) * 2).to(dtype).to(DEV)
    tok = (torch.randn(bsz, tokens, num_classes, generator=gen) * 2).to(dtype).to(DEV)
    kw = dict(smoothing=0.1, cls_weight=0.7, dense_weight=0.5)

    c1, t1 = cls.clone().requires_grad_(), tok.clone().requires_grad_()
    loss = TLL.token_label_loss(c1, t1, values, indices, affine, grid=grid, mix_box=box, **kw)
    (loss * scale).backward()

    c2, t2 = cls.cpu().float().requires_grad_(), tok.cpu().float().requires_grad_()
    targets = ref_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=0.1,
                          mix_box=box.cpu() if isinstance(box, torch.Tensor) else box)
    want = reference.token_label_loss(c2, t2, targets, cls_weight=0.7, dense_weight=0.5)
    (want * scale).backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item())
    # bf16 logits: the kernel accumulates in fp32 and rounds only the stored gradient.
    rtol = 1e-4 if dtype == torch.float32 else 1e-2
    for got, ref in ((c1.grad, c2.grad), (t1.grad, t2.grad)):
        assert got.dtype == dtype
        err = (got.cpu().float() - ref).abs().max().item()
        assert err <= rtol * ref.abs().max().item(), f"grad max err {err:.3g} vs max {ref.abs().max().item():.3g}"


def test_fused_loss_long_rows_per_sample_boxes():
    """Rows longer than one lane block (6x6 top-2 maps over a 1x2 grid: 144 lanes) keep no record;
    their backward rebuilds them. f16 logits, per-sample boxes, upstream gradient 3."""
    values, indices = random_maps(2, 2, 6, 6, 24, seed=41)
    box = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2]], dtype=torch.int32, device=DEV)
    _check_loss(values, indices, full_affine(2), box, (1, 2), 24, torch.float16, 3.0, 2e-3)


def test_fused_loss_every_class_touched_odd_k():
    values, indices = random_maps(3, 4, 5, 5, 3, seed=42, distinct=False)
    _check_loss(values, indices, rotated_sheared_affine(3, seed=42), (0, 1, 2, 2), (2, 2), 3, torch.float32,
                0.5, 1e-4)


def _check_loss(values, indices, affine, box, grid, num_classes, dtype, scale, rtol):
    bsz = values.shape[0]
    gen = torch.Generator().manual_seed(7)
    tokens = grid[0] * grid[1]
    cls = (torch.randn(bsz, num_classes, generator=gen) * 2).to(dtype).to(DEV)
    tok = (torch.randn(bsz, tokens, num_classes, generator=gen) * 2).to(dtype).to(DEV)
    c1, t1 = cls.clone().requires_grad_(), tok.clone().requires_grad_()
    loss = TLL.token_label_loss(c1, t1, values, indices, affine, grid=grid, mix_box=box, smoothing=0.1,
                                cls_weight=0.6, dense_weight=0.8)
    (loss * scale).backward()
    c2, t2 = cls.cpu().float().requires_grad_(), tok.cpu().float().requires_grad_()
    targets = ref_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=0.1,
                          mix_box=box.cpu() if isinstance(box, torch.Tensor) else box)
    want = reference.token_label_loss(c2, t2, targets, cls_weight=0.6, dense_weight=0.8)
    (want * scale).backward()
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item())
    for got, ref in ((c1.grad, c2.grad), (t1.grad, t2.grad)):
        assert got.dtype == dtype
        err = (got.cpu().float() - ref).abs().max().item()
        assert err <= rtol * ref.abs().max().item(), f"grad max err {err:.3g} vs max {ref.abs().max().item():.3g}"


def test_fused_loss_bad_id_is_nan():
    values, indices = random_maps(2, 2, 4, 4, 9, seed=43)
    indices[1, 0, 1, 1] = 9
    cls = torch.randn(2, 9, device=DEV)
    tok = torch.randn(2, 4, 9, device=DEV)
    assert torch.isnan(TLL.token_label_loss(cls, tok, values, indices, crop_flip_affine(2, seed=3))).item()


def test_fused_loss_4d_token_logits_and_dispatch():
    bsz, grid, num_classes = 2, (2, 3), 11
    values, indices = random_maps(bsz, 2, 5, 5, num_classes, seed=21)
    affine = crop_flip_affine(bsz, seed=21)
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(bsz, num_classes, generator=gen).to(DEV)
    tok = torch.randn(bsz, grid[0], grid[1], num_classes, generator=gen).to(DEV)
    fused = ops.token_label_loss(cls, tok, maps=(values, indices), affine=affine, mix_box=(0, 0, 1, 2),
                                 smoothing=0.1, impl="triton")
    plain = ops.token_label_loss(cls.cpu(), tok.cpu(), maps=(values.cpu(), indices.cpu()), affine=affine.cpu(),
                                 mix_box=(0, 0, 1, 2), smoothing=0.1, impl="torch")
    t = ops.token_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=0.1,
                          mix_box=(0, 0, 1, 2), impl="auto")
    given = ops.token_label_loss(cls, tok, t)
    assert abs(fused.item() - plain.item()) <= 1e-4 * plain.item()
    assert abs(given.item() - plain.item()) <= 1e-4 * plain.item()


def test_dispatch_rules():
    values, indices = random_maps(2, 2, 4, 4, 8, seed=1)
    affine = crop_flip_affine(2, seed=1)
    with pytest.raises(ValueError, match="impl"):
        ops.token_targets(values, indices, affine, num_classes=8, impl="cuda")
    cpu = ops.token_targets(values.cpu(), indices.cpu(), affine.cpu(), num_classes=8, grid=(2, 2))
    torch.testing.assert_close(cpu, ref_targets(values, indices, affine, num_classes=8, grid=(2, 2)))
    with pytest.raises(ValueError, match="maps"):
        ops.token_label_loss(torch.zeros(2, 8), torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="square"):
        ops.token_label_loss(torch.zeros(2, 8), torch.zeros(2, 3, 8), maps=(values, indices), affine=affine)


def test_shape_errors_are_clear():
    values, indices = random_maps(2, 2, 4, 4, 8, seed=1)
    with pytest.raises(ValueError, match=r"affine must be \[B, 2, 3\]"):
        TT.token_targets(values, indices, torch.zeros(3, 2, 3, device=DEV), num_classes=8)
    with pytest.raises(ValueError, match="mix_box"):
        TT.token_targets(values, indices, crop_flip_affine(2, 0), num_classes=8,
                         mix_box=torch.zeros(3, 4, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# full size on the GPU
# ----------------------------------------------------------------------------------------------

def _full_size(bsz=128, num_classes=1000, k=5, size=18, grid=(14, 14), seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(bsz, k, size, size, generator=gen) * 3 + 2).half()
    ids = torch.rand(bsz * size * size, num_classes, generator=gen).topk(k, dim=1).indices
    ids = ids.view(bsz, size, size, k).permute(0, 3, 1, 2).to(torch.int16 if num_classes <= 32767 else torch.int32)
    plan = plan_batch(seed, 0, np.arange(bsz), np.stack([np.full(bsz, 375), np.full(bsz, 500)], 1))
    box = tuple(int(x) for x in draw_mix_box(seed, 0, [0], grid).boxes[0])
    return values.cuda(), ids.contiguous().cuda(), torch.as_tensor(plan.affine, dtype=torch.float32).cuda(), box


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("out_dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)])
def test_cuda_full_size_targets(out_dtype, atol):
    values, indices, affine, box = _full_size()
    kw = dict(num_classes=1000, grid=(14, 14), smoothing=0.1, mix_box=box, out_dtype=out_dtype)
    got = ops.token_targets(values, indices, affine, **kw)  # impl="auto" -> Triton on CUDA
    want = reference.token_targets(values, indices, affine, **kw)  # the reference on the same GPU
    assert (got.float() - want.float()).abs().max().item() <= atol


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_large_shapes_targets():
    """ImageNet-21k classes, 64x64 top-16 maps, a 24x24 grid (384 px), a batch that is no block multiple."""
    values, indices, affine, _ = _full_size(bsz=7, num_classes=21841, k=16, size=64, grid=(24, 24), seed=1)
    boxes = draw_mix_box(1, 0, np.arange(7), (24, 24)).tensor("cuda")
    kw = dict(num_classes=21841, grid=(24, 24), smoothing=0.1, mix_box=boxes)
    got = ops.token_targets(values, indices, affine, **kw)
    want = reference.token_targets(values, indices, affine, **kw)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_cuda_full_size_fused_loss(dtype, rtol):
    values, indices, affine, box = _full_size()
    gen = torch.Generator().manual_seed(1)
    cls = (torch.randn(128, 1000, generator=gen) * 2).to(dtype).cuda()
    tok = (torch.randn(128, 196, 1000, generator=gen) * 2).to(dtype).cuda()
    c1, t1 = cls.clone().requires_grad_(), tok.clone().requires_grad_()
    loss = ops.token_label_loss(c1, t1, maps=(values, indices), affine=affine, mix_box=box, smoothing=0.1)
    (loss * 2).backward()
    c2, t2 = cls.float().requires_grad_(), tok.float().requires_grad_()
    targets = reference.token_targets(values, indices, affine, num_classes=1000, grid=(14, 14), smoothing=0.1,
                                      mix_box=box)
    want = reference.token_label_loss(c2, t2, targets)
    (want * 2).backward()
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item())
    for got, ref in ((c1.grad, c2.grad), (t1.grad, t2.grad)):
        assert (got.float() - ref).abs().max().item() <= rtol * ref.abs().max().item()
