"""The numba CPU path (tl_fast.ops.cpu) against the PyTorch reference, on fresh random inputs.

The reference is itself checked against torchvision's roi_align (tests/test_reference_ops.py). The
CPU path computes the softmax in float64, the reference in float32, so float32 rows agree to the
reference's own rounding (a few 1e-6); 16-bit rows are the CPU path's float32 rows rounded to
nearest even, bit for bit.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_fast import geometry, ops
from tl_fast.ops import cpu, reference
from tl_fast.plan import AugmentConfig, draw_mix_box, plan_batch

ATOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def random_maps(bsz, k, h, w, num_classes, seed, idx_dtype=torch.int16):
    """Top-k maps with distinct class ids per position and float16 scores."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(bsz, k, h, w, generator=gen) * 3).half()
    ids = torch.rand(bsz * h * w, num_classes, generator=gen).topk(k, dim=1).indices
    ids = ids.view(bsz, h, w, k).permute(0, 3, 1, 2).contiguous().to(idx_dtype)
    return values, ids


def crop_flip(bsz, seed):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.8
    y1 = torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.8
    x2 = (x1 + 0.005 + torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.6).clamp(max=1.0)
    y2 = (y1 + 0.005 + torch.rand(bsz, generator=gen, dtype=torch.float64) * 0.6).clamp(max=1.0)
    boxes = torch.stack([x1, y1, x2, y2], 1)
    boxes[0] = torch.tensor([0.30, 0.30, 0.31, 0.302], dtype=torch.float64)  # under one map pixel: widened
    if bsz > 1:
        boxes[-1] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # the whole image
    flip = torch.rand(bsz, generator=gen) < 0.5
    flip[0] = True
    return geometry.crop_flip_affine(boxes, flip)


def augmented(bsz, seed):
    """Plan geometry with RandAugment, plus forced rotation, shears and translation."""
    sizes = np.array([[300, 400]] * bsz)
    plan = plan_batch(seed, 0, np.arange(bsz), sizes, AugmentConfig())
    affine = plan.affine.copy()
    extra = [geometry.rotate(np.array(25.0)), geometry.shear_x(np.array(-0.3)), geometry.shear_y(np.array(0.2)),
             geometry.translate(np.array(0.4), np.array(-0.3)), geometry.rotate(np.array(-170.0))]
    for b, m in enumerate(extra[:bsz]):
        affine[b] = geometry.compose(affine[b], m)
    return torch.from_numpy(affine)


def both(values, ids, affine, **kw):
    fast = cpu.token_targets(values, ids, affine, **kw)
    ref = reference.token_targets(values, ids, affine, **kw)
    return fast, ref


def assert_matches(values, ids, affine, **kw):
    fast, ref = both(values, ids, affine, **kw)
    dtype = kw.get("out_dtype", torch.float32)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
    assert torch.isfinite(fast.float()).all()
    diff = (fast.float() - ref.float()).abs().max().item()
    assert diff <= ATOL[dtype], diff
    if dtype != torch.float32:  # 16-bit rows: the float32 rows rounded to nearest even, exactly
        f32 = cpu.token_targets(values, ids, affine, **{**kw, "out_dtype": torch.float32})
        assert torch.equal(fast, f32.to(dtype))
    return fast


def mix_for(kind, bsz, grid, seed=0):
    if kind == "batch":
        return tuple(int(x) for x in draw_mix_box(seed, 0, [1], grid).boxes[0])
    if kind == "sample":
        return draw_mix_box(seed, 0, np.arange(bsz), grid).tensor()
    if kind == "whole":
        return (0, 0, grid[0], grid[1])
    return None


CASES = [
    # bsz, k, h, w, K, grid, geometry
    (6, 5, 18, 18, 1000, (14, 14), "crop"),
    (5, 3, 9, 11, 37, (3, 5), "crop"),      # odd K, odd batch (the middle sample is its own partner)
    (4, 1, 1, 1, 1, (2, 2), "crop"),        # K = 1, a 1x1 map
    (3, 3, 6, 6, 3, (4, 4), "aug"),         # every class touched in every row
    (5, 2, 7, 5, 29, (5, 3), "aug"),        # rotations, shears, translations
    (2, 4, 64, 48, 5003, (7, 9), "crop"),   # large map, large K
    (1, 2, 5, 5, 17, (1, 1), "aug"),        # a single sample, one token
]


@pytest.mark.parametrize("bsz,k,h,w,num_classes,grid,geo", CASES)
@pytest.mark.parametrize("mix", [None, "batch", "sample", "whole"])
def test_matches_reference(bsz, k, h, w, num_classes, grid, geo, mix):
    seed = hash((bsz, k, h, w, num_classes, grid, geo, mix)) % 2**31
    values, ids = random_maps(bsz, k, h, w, num_classes, seed)
    affine = crop_flip(bsz, seed) if geo == "crop" else augmented(bsz, seed)
    out = assert_matches(values, ids, affine, num_classes=num_classes, grid=grid, smoothing=0.1,
                         mix_box=mix_for(mix, bsz, grid, seed))
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_16_bit_outputs(dtype, smoothing):
    values, ids = random_maps(4, 3, 8, 8, 211, seed=4)
    assert_matches(values, ids, crop_flip(4, 4), num_classes=211, grid=(5, 5), smoothing=smoothing,
                   mix_box=mix_for("sample", 4, (5, 5)), out_dtype=dtype)


def test_half_rounding_matches_torch_everywhere():
    """The in-kernel float32 -> bfloat16 / float16 rounding against torch's, over every float16 range
    (subnormals, halfway cases, overflow to inf) and random bit patterns."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 2**-24,
                                                           2**-25, 1.5 * 2**-25, 2**-14, 2**-14 - 2**-25, 1e-8])])
    x = x[torch.isfinite(x)]
    halfway = torch.arange(1, 2**16 - 1, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    x = torch.cat([x, halfway, halfway * (1 + 2**-11)])  # float16 values and points between neighbours
    x = x[torch.isfinite(x)].contiguous()
    s32 = np.empty(1, np.float32)
    sb = s32.view(np.uint32)
    for mode, dtype in ((1, torch.bfloat16), (2, torch.float16)):
        got = np.array([cpu._half_bits(float(v), mode, s32, sb) for v in x.numpy()], dtype=np.uint16)
        want = x.to(dtype).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got, want), (mode, x.numpy()[got != want][:5])


@pytest.mark.parametrize("idx_dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("val_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_input_dtypes(idx_dtype, val_dtype):
    values, ids = random_maps(3, 2, 6, 7, 40, seed=8, idx_dtype=idx_dtype)
    assert_matches(values.to(val_dtype), ids, augmented(3, 8).float(), num_classes=40, grid=(3, 3),
                   mix_box=(0, 1, 2, 3))


def test_token_rows_are_the_float64_softmax_of_the_reference_scores():
    """Scores are summed in the reference's order and precision, so token rows equal a float64 softmax
    of the reference's scores to float32 rounding (the reference itself is off by its float32 softmax)."""
    values, ids = random_maps(5, 5, 18, 18, 300, seed=21)
    affine = crop_flip(5, 21)
    fast = cpu.token_targets(values, ids, affine, num_classes=300, grid=(14, 14))
    scores = reference.token_scores(values, ids, affine, num_classes=300, grid=(14, 14))
    exact = scores[:, 1:].double().softmax(-1)
    assert (fast[:, 1:].double() - exact).abs().max().item() <= 2e-7


def test_boxes_beyond_the_grid_and_empty_boxes():
    values, ids = random_maps(4, 2, 6, 6, 19, seed=5)
    boxes = torch.tensor([[-2, 1, 3, 9], [0, 0, 0, 0], [3, 3, 1, 1], [1, -5, 99, 2]])
    assert_matches(values, ids, crop_flip(4, 5), num_classes=19, grid=(4, 4), smoothing=0.1, mix_box=boxes)


def _poisoned(kind):
    values, ids = random_maps(4, 3, 6, 6, 23, seed=6)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4, dtype=torch.float64)  # every pixel is read
    affine = geometry.crop_flip_affine(whole, torch.tensor([False, True, False, True]))
    if kind == "nan":
        values[1, 0, 2, 3] = float("nan")
    elif kind == "inf":
        values[2, 1, 0, 0] = float("inf")
    elif kind == "-inf":
        values[0, 2, 5, 5] = float("-inf")
    elif kind == "affine":
        affine = affine.clone()
        affine[3, 0, 1] = float("nan")
    return values, ids, affine


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "affine"])
@pytest.mark.parametrize("mix", [None, "batch"])
def test_non_finite_inputs_as_the_reference(kind, mix):
    values, ids, affine = _poisoned(kind)
    kw = dict(num_classes=23, grid=(3, 3), smoothing=0.1, mix_box=mix_for(mix, 4, (3, 3)))
    if kind == "affine":  # the reference fails on the garbage sample counts; so does the CPU path
        for fn in (cpu.token_targets, reference.token_targets):
            with pytest.raises(RuntimeError):
                fn(values, ids, affine, **kw)
        return
    fast, ref = both(values, ids, affine, **kw)
    if kind != "-inf":  # -inf times a positive weight is a finite 0 share, not a NaN
        assert not torch.isfinite(ref).all()  # the case does poison something
    torch.testing.assert_close(fast, ref, equal_nan=True, rtol=0, atol=1e-5)


def test_errors_as_the_reference():
    values, ids = random_maps(2, 2, 4, 4, 10, seed=1)
    affine = crop_flip(2, 1)
    with pytest.raises(ValueError, match="class ids"):
        cpu.token_targets(values, ids + 10, affine, num_classes=10, grid=(2, 2))
    with pytest.raises(ValueError, match="class ids"):
        cpu.token_targets(values, ids - 5, affine, num_classes=10, grid=(2, 2))
    with pytest.raises(ValueError, match="affine"):
        cpu.token_targets(values, ids, affine[:1], num_classes=10)
    with pytest.raises(ValueError, match="mix_box"):
        cpu.token_targets(values, ids, affine, num_classes=10, grid=(2, 2), mix_box=torch.zeros(3, 4))


def test_thread_counts_agree_bit_for_bit():
    values, ids = random_maps(13, 5, 12, 12, 101, seed=9)
    kw = dict(num_classes=101, grid=(6, 6), smoothing=0.1, mix_box=mix_for("sample", 13, (6, 6)))
    one = cpu.token_targets(values, ids, augmented(13, 9), threads=1, **kw)
    for threads in (2, 3, 8):
        assert torch.equal(one, cpu.token_targets(values, ids, augmented(13, 9), threads=threads, **kw))


@pytest.mark.parametrize("mix", [None, "batch", "sample"])
def test_loss_from_maps_values_and_gradients(mix):
    """The loss from maps through the CPU path against the reference's targets + loss, value and
    gradients, with a non-unit upstream gradient."""
    bsz, num_classes, grid = 4, 37, (3, 3)
    values, ids = random_maps(bsz, 3, 7, 7, num_classes, seed=13)
    affine = augmented(bsz, 13)
    gen = torch.Generator().manual_seed(13)
    cls = torch.randn(bsz, num_classes, generator=gen)
    tok = torch.randn(bsz, 9, num_classes, generator=gen)
    box = mix_for(mix, bsz, grid)
    kw = dict(maps=(values, ids), affine=affine, mix_box=box, grid=grid, smoothing=0.1, cls_weight=1.0,
              dense_weight=0.5)
    results = []
    for impl in ("auto", "torch"):
        c, t = cls.clone().requires_grad_(), tok.clone().requires_grad_()
        loss = ops.token_label_loss(c, t, impl=impl, **kw)
        (2.0 * loss).backward()
        results.append((loss.detach(), c.grad, t.grad))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["token", "class"])
@settings(max_examples=30, deadline=None)
@given(
    bsz=st.integers(1, 5), k=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
    num_classes=st.integers(4, 60), gh=st.integers(1, 5), gw=st.integers(1, 5),
    smoothing=st.sampled_from([0.0, 0.1]), mix=st.sampled_from([None, "batch", "sample"]),
    geo=st.sampled_from(["crop", "aug"]), seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(op, bsz, k, h, w, num_classes, gh, gw, smoothing, mix, geo, seed):
    values, ids = random_maps(bsz, k, h, w, num_classes, seed)
    affine = crop_flip(bsz, seed) if geo == "crop" else augmented(bsz, seed)
    check = assert_matches if op == "token" else assert_class_matches
    check(values, ids, affine, num_classes=num_classes, grid=(gh, gw), smoothing=smoothing,
          mix_box=mix_for(mix, bsz, (gh, gw), seed))


_CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cpu_ops import random_maps, crop_flip
from tl_fast.ops import cpu, reference
values, ids = random_maps(3, 2, 6, 6, 31, seed=17)
affine = crop_flip(3, 17)
kw = dict(num_classes=31, grid=(3, 3), smoothing=0.1, mix_box=(0, 0, 2, 2))
fast = cpu.token_targets(values, ids, affine, threads=2, **kw)
ref = reference.token_targets(values, ids, affine, **kw)
print("diff", (fast - ref).abs().max().item())
"""


def test_fresh_process_with_numba_cache():
    """A new interpreter loads the kernels from numba's on-disk cache (written by this process's
    compile) and computes the same targets."""
    values, ids = random_maps(2, 2, 4, 4, 9, seed=3)
    cpu.token_targets(values, ids, crop_flip(2, 3), num_classes=9, grid=(2, 2))  # compiled and cached here
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = _CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert float(run.stdout.split("diff")[-1]) <= 1e-5


def _child_targets(queue):
    values, ids = random_maps(6, 2, 5, 5, 13, seed=19)
    out = cpu.token_targets(values, ids, crop_flip(6, 19), num_classes=13, grid=(2, 2), threads=2)
    queue.put(float(out.sum()))


def test_forked_child_builds_its_own_thread_pool():
    """A data-loader worker forked after the parent used the thread pool must not wait on the
    parent's (absent) threads."""
    values, ids = random_maps(6, 2, 5, 5, 13, seed=19)
    expect = float(cpu.token_targets(values, ids, crop_flip(6, 19), num_classes=13, grid=(2, 2), threads=2).sum())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_targets, args=(queue,))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and got == expect


# ----------------------------------------------------------------------------------------------
# class-token-only targets (row 0 alone) and the one dispatch shared with the token ops
# ----------------------------------------------------------------------------------------------

def assert_class_matches(values, ids, affine, **kw):
    fast = cpu.class_targets(values, ids, affine, **kw)
    ref = reference.class_targets(values, ids, affine, **kw)
    dtype = kw.get("out_dtype", torch.float32)
    assert fast.shape == ref.shape == (values.shape[0], kw["num_classes"]) and fast.dtype == ref.dtype == dtype
    assert torch.isfinite(fast.float()).all()
    diff = (fast.float() - ref.float()).abs().max().item()
    assert diff <= ATOL[dtype], diff
    return fast


@pytest.mark.parametrize("bsz,k,h,w,num_classes,grid,geo", CASES)
@pytest.mark.parametrize("mix", [None, "batch", "sample", "whole"])
def test_class_targets_match_reference(bsz, k, h, w, num_classes, grid, geo, mix):
    seed = hash(("class", bsz, k, h, w, num_classes, grid, geo, mix)) % 2**31
    values, ids = random_maps(bsz, k, h, w, num_classes, seed)
    affine = crop_flip(bsz, seed) if geo == "crop" else augmented(bsz, seed)
    kw = dict(num_classes=num_classes, grid=grid, smoothing=0.1, mix_box=mix_for(mix, bsz, grid, seed))
    out = assert_class_matches(values, ids, affine, **kw)
    torch.testing.assert_close(out.sum(-1), torch.ones(bsz), atol=1e-5, rtol=0)
    # the class row of the token path, computed alone: the same float64 row, the same mix
    assert torch.equal(out, cpu.token_targets(values, ids, affine, **kw)[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["tl_fast", "official"])
def test_class_targets_dtypes_and_smoothing_rules(dtype, rule):
    values, ids = random_maps(5, 3, 9, 7, 53, seed=31)
    out = assert_class_matches(values, ids, crop_flip(5, 31), num_classes=53, grid=(4, 4), smoothing=0.2,
                               mix_box=mix_for("sample", 5, (4, 4), 31), out_dtype=dtype, smoothing_rule=rule)
    rows = out.double().sum(-1)
    want = 1.0 + 0.2 / 53 if rule == "official" else 1.0
    assert (rows - want).abs().max().item() <= ATOL[dtype] * 53


def test_class_targets_threads_boxes_and_bad_inputs_as_the_reference():
    values, ids = random_maps(13, 5, 12, 12, 101, seed=33)
    kw = dict(num_classes=101, grid=(6, 6), smoothing=0.1, mix_box=mix_for("sample", 13, (6, 6)))
    one = cpu.class_targets(values, ids, augmented(13, 33), threads=1, **kw)
    for threads in (2, 5):
        assert torch.equal(one, cpu.class_targets(values, ids, augmented(13, 33), threads=threads, **kw))
    boxes = torch.tensor([[-2, 1, 3, 9], [0, 0, 0, 0], [3, 3, 1, 1], [1, -5, 99, 2]])
    v4, i4 = random_maps(4, 2, 6, 6, 19, seed=5)
    assert_class_matches(v4, i4, crop_flip(4, 5), num_classes=19, grid=(4, 4), smoothing=0.1, mix_box=boxes)
    for kind in ("nan", "inf"):
        v, i, a = _poisoned(kind)
        got = cpu.class_targets(v, i, a, num_classes=23, smoothing=0.1, mix_box=(0, 0, 1, 1), grid=(3, 3))
        want = reference.class_targets(v, i, a, num_classes=23, smoothing=0.1, mix_box=(0, 0, 1, 1), grid=(3, 3))
        assert not torch.isfinite(want).all()
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=1e-5)
    v, i = random_maps(2, 2, 4, 4, 10, seed=1)
    for bad_ids in (i + 10, i - 5):
        with pytest.raises(ValueError, match="class ids"):
            cpu.class_targets(v, bad_ids, crop_flip(2, 1), num_classes=10)
    with pytest.raises(ValueError, match="mix_box"):
        cpu.class_targets(v, i, crop_flip(2, 1), num_classes=10, mix_box=torch.zeros(3, 4))


def _token_and_class_ops(impl, values, ids, affine, kw):
    return (lambda: ops.token_targets(values, ids, affine, impl=impl, **kw),
            lambda: ops.class_targets(values, ids, affine, impl=impl, **kw))


def test_one_dispatch_for_token_and_class_ops(monkeypatch):
    """The same ``impl`` runs the same implementation for both kinds of op, and fails the same way."""
    values, ids = random_maps(3, 2, 5, 5, 11, seed=2)
    affine = crop_flip(3, 2)
    kw = dict(num_classes=11, grid=(2, 2), mix_box=(0, 0, 1, 1), smoothing=0.1)
    for impl, module in (("auto", cpu), ("cpu", cpu), ("torch", reference)):
        assert torch.equal(ops.class_targets(values, ids, affine, impl=impl, **kw),
                           module.class_targets(values, ids, affine, **kw)), impl
        assert torch.equal(ops.token_targets(values, ids, affine, impl=impl, **kw),
                           module.token_targets(values, ids, affine, **kw)), impl
    assert ops.choose_impl("auto", torch.device("cpu")) == "cpu"
    assert ops.choose_impl("auto", torch.device("meta")) == "torch"
    for call in _token_and_class_ops("cpu", values.to("meta"), ids.to("meta"), affine, kw):
        with pytest.raises(RuntimeError, match="impl='cpu' needs CPU tensors, got meta"):
            call()
    for call in _token_and_class_ops("numba", values, ids, affine, kw):
        with pytest.raises(ValueError, match="impl must be one of"):
            call()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for call in _token_and_class_ops("triton", values, ids, affine, kw):
        with pytest.raises(RuntimeError, match="needs Triton's interpreter"):
            call()


@pytest.mark.parametrize("mix", [None, "batch", "sample"])
def test_class_loss_from_maps_values_and_gradients(mix):
    bsz, num_classes, grid = 6, 41, (3, 3)
    values, ids = random_maps(bsz, 3, 7, 7, num_classes, seed=35)
    affine = augmented(bsz, 35)
    logits = torch.randn(bsz, num_classes, generator=torch.Generator().manual_seed(35))
    kw = dict(maps=(values, ids), affine=affine, mix_box=mix_for(mix, bsz, grid), grid=grid, smoothing=0.1)
    results = []
    for impl in ("auto", "torch"):
        z = logits.clone().requires_grad_()
        loss = ops.class_token_loss(z, impl=impl, **kw)
        (2.0 * loss).backward()
        results.append((loss.detach(), z.grad))
    for fast, ref in zip(*results):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)

