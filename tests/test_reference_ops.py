"""The PyTorch reference ops against torchvision's roi_align and a brute-force loop over samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.baselines import public_token_targets
from tl_fast import geometry
from tl_fast.ops import reference
from tl_fast.plan import AugmentConfig, draw_mix_box, plan_batch


def random_maps(bsz: int, k: int, h: int, w: int, num_classes: int, gen: torch.Generator):
    """Top-k maps with distinct class ids per position, float16 scores (like annotator logits)."""
    values = (torch.randn(bsz, k, h, w, generator=gen) * 3).half()
    scores = torch.rand(bsz * h * w, num_classes, generator=gen)
    ids = scores.topk(k, dim=1).indices.view(bsz, h, w, k).permute(0, 3, 1, 2).contiguous()
    return values, ids


def random_boxes(bsz: int, gen: torch.Generator) -> torch.Tensor:
    x1 = torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.8
    y1 = torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.8
    x2 = (x1 + 0.005 + torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.6).clamp(max=1.0)
    y2 = (y1 + 0.005 + torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.6).clamp(max=1.0)
    return torch.stack([x1, y1, x2, y2], 1)


CASES = [
    # bsz, k, h, w, K, grid
    (12, 5, 18, 18, 1000, (14, 14)),  # > 8 MB of targets: the huge-page output path
    (3, 1, 7, 11, 37, (3, 5)),
    (4, 3, 9, 6, 13, (1, 1)),
    (5, 2, 5, 5, 6, (7, 7)),  # tokens smaller than a map pixel
]


@pytest.mark.parametrize("bsz,k,h,w,num_classes,grid", CASES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torchvision_public_path(bsz, k, h, w, num_classes, grid, smoothing):
    gen = torch.Generator().manual_seed(hash((bsz, k, h, w, num_classes, grid)) % 2**31)
    values, ids = random_maps(bsz, k, h, w, num_classes, gen)
    boxes = random_boxes(bsz, gen)
    boxes[0] = torch.tensor([0.30, 0.30, 0.31, 0.302], dtype=torch.float64)  # under one map pixel
    boxes[-1] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # whole image
    flip = torch.rand(bsz, generator=gen) < 0.5
    flip[0] = True  # widened flipped crop keeps its right edge
    affine = geometry.crop_flip_affine(boxes, flip)
    ours = reference.token_targets(values, ids, affine, num_classes=num_classes, grid=grid, smoothing=smoothing)
    public = public_token_targets(values, ids, boxes, flip, num_classes=num_classes, grid=grid, smoothing=smoothing)
    assert ours.shape == (bsz, 1 + grid[0] * grid[1], num_classes)
    assert (ours - public).abs().max().item() <= 1e-5
    torch.testing.assert_close(ours.sum(-1), torch.ones(bsz, 1 + grid[0] * grid[1]), atol=1e-5, rtol=0)


def test_matches_public_path_with_mixtoken_and_plan_geometry():
    """Crops drawn by the plan (integer pixel boxes) plus a per-batch MixToken box."""
    gen = torch.Generator().manual_seed(7)
    bsz, num_classes = 8, 100
    values, ids = random_maps(bsz, 5, 18, 18, num_classes, gen)
    sizes = np.array([[375, 500], [500, 333], [224, 224], [180, 400], [400, 160], [300, 300], [256, 512], [480, 640]])
    plan = plan_batch(3, 1, np.arange(bsz), sizes, AugmentConfig(randaugment=None))
    box = draw_mix_box(3, 1, [0], (14, 14)).boxes[0]
    ours = reference.token_targets(values, ids, plan.affine_tensor(dtype=torch.float64), num_classes=num_classes,
                                   mix_box=tuple(box), smoothing=0.1)
    public = public_token_targets(values, ids, torch.from_numpy(plan.box), torch.from_numpy(plan.flip),
                                  num_classes=num_classes, mix_box=tuple(box), smoothing=0.1)
    assert (ours - public).abs().max().item() <= 1e-5


def brute_force_scores(values, ids, affine, num_classes, grid):
    """docs/spec.md section 3 read literally: dense map, then a Python loop over tokens and samples."""
    bsz, k, h, w = values.shape
    dense = torch.zeros(bsz, num_classes, h, w, dtype=torch.float64)
    dense.scatter_(1, ids.long(), values.double())

    def bilinear(b, px, py):
        if py < -1 or py > h or px < -1 or px > w:
            return torch.zeros(num_classes, dtype=torch.float64)
        y, x = max(py, 0.0), max(px, 0.0)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        if y0 >= h - 1:
            y0 = y1 = h - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= w - 1:
            x0 = x1 = w - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        d = dense[b]
        return (1 - ly) * (1 - lx) * d[:, y0, x0] + (1 - ly) * lx * d[:, y0, x1] + ly * (1 - lx) * d[:, y1, x0] + ly * lx * d[:, y1, x1]

    def pooled(b, a, gh, gw):
        ext_u = math.hypot(a[0, 0] * w, a[1, 0] * h)
        ext_v = math.hypot(a[0, 1] * w, a[1, 1] * h)
        a = a.clone()
        if ext_u < 1:
            a[:, 0] /= ext_u
            ext_u = 1.0
        if ext_v < 1:
            a[:, 1] /= ext_v
            ext_v = 1.0
        sx = max(1, math.ceil(ext_u / gw - reference.EXTENT_EPS))
        sy = max(1, math.ceil(ext_v / gh - reference.EXTENT_EPS))
        rows = []
        for r in range(gh):
            for c in range(gw):
                acc = torch.zeros(num_classes, dtype=torch.float64)
                for j in range(sy):
                    for i in range(sx):
                        u = (c + (i + 0.5) / sx) / gw
                        v = (r + (j + 0.5) / sy) / gh
                        x = a[0, 0] * u + a[0, 1] * v + a[0, 2]
                        y = a[1, 0] * u + a[1, 1] * v + a[1, 2]
                        acc += bilinear(b, float(x * w - 0.5), float(y * h - 0.5))
                rows.append(acc / (sx * sy))
        return rows

    out = []
    for b in range(bsz):
        a = affine[b].double()
        out.append(torch.stack(pooled(b, a, 1, 1) + pooled(b, a, *grid)))
    return torch.stack(out).float()


def test_randaugment_affines_match_brute_force():
    gen = torch.Generator().manual_seed(11)
    bsz, num_classes, grid = 6, 23, (4, 3)
    values, ids = random_maps(bsz, 3, 10, 12, num_classes, gen)
    sizes = np.array([[300, 400]] * bsz)
    plan = plan_batch(5, 0, np.arange(100, 100 + bsz), sizes, AugmentConfig())
    # Force strong geometry on a few samples so rotation/shear/translation all appear.
    extra = [geometry.rotate(np.array(25.0)), geometry.shear_x(np.array(-0.3)), geometry.shear_y(np.array(0.2)),
             geometry.translate(np.array(0.4), np.array(-0.3))]
    affine = plan.affine.copy()
    for b, m in enumerate(extra):
        affine[b] = geometry.compose(affine[b], m)
    affine = torch.from_numpy(affine)
    ours = reference.token_scores(values, ids, affine, num_classes=num_classes, grid=grid)
    brute = brute_force_scores(values, ids, affine, num_classes, grid)
    assert (ours - brute).abs().max().item() <= 1e-5


def test_mixtoken_semantics_per_batch_and_per_sample():
    gen = torch.Generator().manual_seed(3)
    bsz, num_classes, grid = 5, 17, (4, 4)
    values, ids = random_maps(bsz, 2, 6, 6, num_classes, gen)
    affine = geometry.crop_flip_affine(random_boxes(bsz, gen), torch.zeros(bsz, dtype=torch.bool))
    clean = reference.token_targets(values, ids, affine, num_classes=num_classes, grid=grid)
    box = (1, 0, 3, 2)  # rows [1, 3), cols [0, 2): 4 of 16 tokens
    mixed = reference.token_targets(values, ids, affine, num_classes=num_classes, grid=grid, mix_box=box)
    tok = clean[:, 1:].view(bsz, 4, 4, -1)
    mtok = mixed[:, 1:].view(bsz, 4, 4, -1)
    for b in range(bsz):
        p = bsz - 1 - b
        for r in range(4):
            for c in range(4):
                src = p if (1 <= r < 3 and 0 <= c < 2) else b
                torch.testing.assert_close(mtok[b, r, c], tok[src, r, c])
        lam = 1 - 4 / 16
        torch.testing.assert_close(mixed[b, 0], lam * clean[b, 0] + (1 - lam) * clean[p, 0])
    # Per-sample boxes: each row follows its own box; an empty box leaves the sample clean.
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 0, 0], [1, 1, 2, 3], [2, 2, 4, 4], [0, 3, 4, 4]])
    per = reference.token_targets(values, ids, affine, num_classes=num_classes, grid=grid, mix_box=boxes)
    torch.testing.assert_close(per[1], clean[1])
    torch.testing.assert_close(per[0, 1:], clean[-1, 1:])
    torch.testing.assert_close(per[0, 0], clean[-1, 0])
    for b in range(bsz):
        r1, c1, r2, c2 = boxes[b].tolist()
        lam = 1 - (r2 - r1) * (c2 - c1) / 16
        torch.testing.assert_close(per[b, 0], lam * clean[b, 0] + (1 - lam) * clean[bsz - 1 - b, 0])


def test_untouched_classes_keep_equal_share_and_smoothing_sums_to_one():
    gen = torch.Generator().manual_seed(5)
    values, ids = random_maps(2, 2, 4, 4, 50, gen)
    affine = geometry.crop_flip_affine(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([False, True]))
    t = reference.token_targets(values, ids, affine, num_classes=50, grid=(2, 2), smoothing=0.2)
    touched = torch.zeros(50, dtype=torch.bool)
    touched[ids.unique().long()] = True
    untouched = t[0, 0, ~touched]
    assert untouched.numel() > 0
    torch.testing.assert_close(untouched, untouched[:1].expand_as(untouched))
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    assert t.min() >= 0.2 / 50 - 1e-7


def test_bfloat16_output_and_input_errors():
    gen = torch.Generator().manual_seed(1)
    values, ids = random_maps(2, 2, 4, 4, 10, gen)
    affine = geometry.crop_flip_affine(torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), torch.tensor([False, False]))
    t = reference.token_targets(values, ids, affine, num_classes=10, grid=(2, 2), out_dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="class ids"):
        reference.token_targets(values, ids + 10, affine, num_classes=10, grid=(2, 2))
    with pytest.raises(ValueError, match="affine"):
        reference.token_targets(values, ids, affine[:1], num_classes=10)
    with pytest.raises(ValueError, match="mix_box"):
        reference.token_targets(values, ids, affine, num_classes=10, grid=(2, 2), mix_box=torch.zeros(3, 4))


def test_loss_matches_explicit_formula():
    gen = torch.Generator().manual_seed(2)
    bsz, tokens, num_classes = 3, 4, 9
    cls = torch.randn(bsz, num_classes, generator=gen, requires_grad=True)
    tok = torch.randn(bsz, tokens, num_classes, generator=gen, requires_grad=True)
    targets = torch.rand(bsz, 1 + tokens, num_classes, generator=gen).softmax(-1)
    loss = reference.token_label_loss(cls, tok, targets, cls_weight=1.0, dense_weight=0.5)
    expect_cls = sum(-(targets[b, 0] * cls[b].log_softmax(-1)).sum() for b in range(bsz)) / bsz
    expect_tok = sum(-(targets[b, 1 + t] * tok[b, t].log_softmax(-1)).sum() for b in range(bsz) for t in range(tokens)) / (bsz * tokens)
    torch.testing.assert_close(loss, expect_cls + 0.5 * expect_tok)


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9), num_classes=st.integers(4, 40),
    gh=st.integers(1, 5), gw=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
)
def test_property_crop_flip_matches_torchvision(k, h, w, num_classes, gh, gw, seed):
    gen = torch.Generator().manual_seed(seed)
    values, ids = random_maps(3, k, h, w, num_classes, gen)
    boxes = random_boxes(3, gen)
    flip = torch.rand(3, generator=gen) < 0.5
    ours = reference.token_targets(values, ids, geometry.crop_flip_affine(boxes, flip), num_classes=num_classes, grid=(gh, gw))
    public = public_token_targets(values, ids, boxes, flip, num_classes=num_classes, grid=(gh, gw))
    assert (ours - public).abs().max().item() <= 1e-5
