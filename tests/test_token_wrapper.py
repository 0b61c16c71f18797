"""``tl_fast.models.token_labeling``: token labeling for timm's ViT, DeiT (distilled), register-token ViT,
EVA-02, Swin, ConvNeXt and VOLO, each tiny (two or four blocks, small widths, 32-96 px images).

Per family: shapes and the grid (the total stride); a MixToken box over the whole grid gives the
partner's unmixed forward; with the blocks replaced by pass-throughs every token logit equals the one
of the sample the token *targets* say it comes from (``tl_fast.ops.reference.apply_mixtoken``), on
non-square grids with boxes whose rows and columns differ, so a transposed or mis-scaled box fails;
the class output is the model's own; the loss from the maps trains backbone and aux head. Then the
state-dict names, the optimizer's names, a plain timm checkpoint, and the one-line errors.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import timm  # noqa: E402
from timm.models.volo import VOLO  # noqa: E402

from tl_fast import ops  # noqa: E402
from tl_fast.models import TokenLabeling, create_lvvit, is_token_labeling_model, token_labeling  # noqa: E402
from tl_fast.ops.reference import apply_mixtoken  # noqa: E402
from test_kernels import _kernel_modules, crop_flip_affine, random_maps  # noqa: E402

_kernel_modules()  # the kernels in this process's mode (Triton's interpreter without CUDA)
K = 5


class PassThrough(nn.Module):
    """A block that returns its input (EVA's blocks take a ``rope=`` keyword)."""

    def forward(self, x, *args, **kwargs):
        return x


def _blocks(*containers):
    for blocks in containers:
        for i in range(len(blocks)):
            blocks[i] = PassThrough()


def _vit(name, **kw):
    return timm.create_model(name, num_classes=K, patch_size=8, depth=2, embed_dim=32, num_heads=2, **kw)


# name -> (build, input size (H, W), grid at that size, prefix tokens, replace the blocks by pass-throughs)
FAMILIES = {
    "vit": (lambda: _vit("vit_tiny_patch16_224", img_size=(32, 48)), (32, 48), (4, 6), 1,
            lambda m: _blocks(m.blocks)),
    "deit_distilled": (lambda: _vit("deit_tiny_distilled_patch16_224", img_size=(40, 24)), (40, 24), (5, 3), 2,
                       lambda m: _blocks(m.blocks)),
    "vit_registers": (lambda: _vit("vit_little_patch16_reg4_gap_256", img_size=(32, 48)), (32, 48), (4, 6), 4,
                      lambda m: _blocks(m.blocks)),
    "eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", num_classes=K, img_size=(56, 84), depth=2,
                                        embed_dim=32, num_heads=2), (56, 84), (4, 6), 1,
              lambda m: _blocks(m.blocks)),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=K, img_size=(64, 96), embed_dim=16,
                                       depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2), (64, 96), (2, 3), 0,
             lambda m: _blocks(*(layer.blocks for layer in m.layers))),
    "convnext": (lambda: timm.create_model("convnext_atto", num_classes=K, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1)),
                 (128, 64), (4, 2), 0, lambda m: _blocks(*(stage.blocks for stage in m.stages))),
    "volo": (lambda: VOLO(layers=[1, 1, 1, 1], embed_dims=[32, 64, 64, 64], num_heads=[1, 2, 2, 2], img_size=(64, 96),
                          num_classes=K), (64, 96), (4, 6), 1,
             lambda m: _blocks(*(s for s in m.network if isinstance(s, nn.Sequential)))),
}
STRIDES = {"vit": 8, "deit_distilled": 8, "vit_registers": 8, "eva02": 14, "swin": 32, "convnext": 32, "volo": 16}


def build(family, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    make, size, grid, prefix, identity = FAMILIES[family]
    model = make()
    return model.to(dtype), size, grid, prefix, identity


def images(size, batch=4, dtype=torch.float64, seed=1):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def boxes(grid, batch):
    """A batch box and per-sample boxes, rows and columns different (and one sample unmixed)."""
    gh, gw = grid
    one = (1, gw - 2, gh, gw) if gw > 2 else (0, 1, gh - 1, 2)
    per = [(0, 0, 1, gw), (1, 0, gh, 1), (0, 0, 0, 0), (gh - 1, 1, gh, gw)][:batch]
    return [torch.tensor(one, dtype=torch.int32), torch.tensor(per, dtype=torch.int32)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shapes_grid_and_the_models_own_class_output(family):
    model, size, grid, prefix, _ = build(family)
    model.eval()
    wrapped = token_labeling(model).eval()
    assert isinstance(wrapped, TokenLabeling) and is_token_labeling_model(wrapped) and wrapped.model is model
    assert wrapped.stride == STRIDES[family] and wrapped.token_grid(size) == grid
    assert wrapped._num_prefix == prefix
    x = images(size)
    with torch.no_grad():
        cls, tokens = wrapped.forward_train(x)
        own = model(x)
        logits = wrapped(x)
    assert cls.shape == (4, K) and tokens.shape == (4, grid[0] * grid[1], K)
    if family == "volo":  # VOLO's own logits are its inference rule (class head + 0.5 max of its aux head)
        torch.testing.assert_close(logits, own, rtol=0, atol=1e-12)
        torch.testing.assert_close(cls, model.head(model.forward_features(x)[:, 0]), rtol=0, atol=1e-12)
        assert wrapped.token_head is model.aux_head
    else:
        torch.testing.assert_close(cls, own, rtol=0, atol=1e-12)
        torch.testing.assert_close(logits, cls + 0.5 * tokens.max(1).values, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"total stride {STRIDES[family]}"):
        wrapped.token_grid((size[0] + STRIDES[family] // 2, size[1]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_box_over_the_whole_grid_gives_the_partners_forward(family):
    model, size, grid, _, _ = build(family)
    wrapped = token_labeling(model).eval()
    x = images(size)
    with torch.no_grad():
        cls, tokens = wrapped.forward_train(x)
        cls_mix, tokens_mix = wrapped.forward_train(x, (0, 0, grid[0], grid[1]))
    torch.testing.assert_close(cls_mix, cls.flip(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens_mix, tokens.flip(0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("box_kind", ["batch", "per_sample"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_tokens_come_from_where_the_targets_say(family, box_kind):
    """Blocks replaced by pass-throughs: each final token depends only on the first-map tokens of its own
    cell, so it must equal the token of the sample its *target* was taken from (the targets' mixing,
    ``apply_mixtoken``, on targets that record their source sample)."""
    model, size, grid, _, identity = build(family)
    identity(model)
    wrapped = token_labeling(model).eval()
    x = images(size)
    box = boxes(grid, 4)[box_kind == "per_sample"]
    with torch.no_grad():
        _, clean = wrapped.forward_train(x)
        _, mixed = wrapped.forward_train(x, box)
    b, t = clean.shape[:2]
    source = torch.arange(b, dtype=torch.float64).view(b, 1, 1).expand(b, 1 + t, 1)
    source = apply_mixtoken(source, box, grid)[:, 1:, 0].round().long()  # [B, T]: whose target each token has
    assert (source != torch.arange(b).view(b, 1)).any(), "the box mixes nothing"
    expected = clean[source, torch.arange(t).view(1, t)]
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-12)
    # The test can fail: tokens of the two sources differ wherever a token was mixed.
    moved = source != torch.arange(b).view(b, 1)
    assert ((clean[moved] - clean.flip(0)[moved]).abs().amax(-1) > 1e-6).all()


# The fused kernel (in Triton's interpreter without CUDA, slow) once, the CPU path for every layout.
@pytest.mark.parametrize("family, impl", [("vit", "triton"), ("vit", "cpu"), ("swin", "cpu"), ("convnext", "cpu"),
                                          ("volo", "cpu")])
def test_loss_from_maps_trains_backbone_and_aux_head(family, impl):
    model, size, grid, _, _ = build(family, dtype=torch.float32)
    wrapped = token_labeling(model).train()
    values, indices = random_maps(4, 3, 6, 6, K, seed=2)
    affine = crop_flip_affine(4, seed=3).to(values.device)
    box = boxes(grid, 4)[0]
    cls, tokens = wrapped.to(values.device).forward_train(images(size, dtype=torch.float32).to(values.device), box)
    loss = ops.token_label_loss(cls, tokens, maps=(values, indices), affine=affine, mix_box=box, num_classes=K,
                                grid=grid, smoothing=0.1, impl=impl)
    want = ops.token_label_loss(cls.detach().cpu(), tokens.detach().cpu(), ops.token_targets(
        values.cpu(), indices.cpu(), affine.cpu(), num_classes=K, grid=grid, smoothing=0.1, mix_box=box, impl="torch"))
    assert abs(loss.item() - want.item()) < 1e-4
    loss.backward()
    stem = dict(model.named_modules())[wrapped.stem_name]
    for name, module in (("stem", stem), ("aux head", wrapped.token_head), ("class head", model.get_classifier())):
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_state_dict_is_the_models_plus_the_aux_head_and_a_timm_checkpoint_loads():
    model, size, _, _, _ = build("vit", dtype=torch.float32)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = token_labeling(model)
    state = wrapped.state_dict()
    assert set(state) == set(plain) | {"aux_head.weight", "aux_head.bias"}
    assert [n for n, _ in wrapped.named_parameters()] == list(dict(model.named_parameters())) + \
        ["aux_head.weight", "aux_head.bias"]
    fresh, *_ = build("vit", dtype=torch.float32, seed=5)
    other = token_labeling(fresh)
    result = other.load_state_dict(plain, strict=False)  # a plain timm checkpoint: only the aux head is new
    assert sorted(result.missing_keys) == ["aux_head.bias", "aux_head.weight"] and not result.unexpected_keys
    other.load_state_dict(state)  # and the wrapper's own, strictly
    x = images(size, dtype=torch.float32)
    torch.testing.assert_close(other.eval()(x), wrapped.eval()(x))
    # Wrapped inside another module (DDP's "module.", EMA's "module."), names keep the outer prefix only.
    outer = nn.ModuleDict({"module": wrapped})
    assert set(outer.state_dict()) == {f"module.{k}" for k in state}
    nn.ModuleDict({"module": other}).load_state_dict(outer.state_dict())


def test_optimizer_groups_use_the_models_names():
    from timm.optim import create_optimizer_v2
    model, *_ = build("vit", dtype=torch.float32)
    wrapped = token_labeling(model)
    assert wrapped.no_weight_decay() == model.no_weight_decay()
    opt = create_optimizer_v2(wrapped, opt="adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay
    assert id(wrapped.aux_head.bias) in no_decay and id(wrapped.aux_head.weight) not in no_decay
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in wrapped.parameters())
    # Layer-wise decay through the model's group_matcher: the aux head learns at the head's rate.
    decayed = create_optimizer_v2(wrapped, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in decayed.param_groups for p in g["params"]}
    assert scale[id(wrapped.aux_head.weight)] == scale[id(model.head.weight)] == 1.0
    assert scale[id(model.patch_embed.proj.weight)] < 1.0


def test_lvvit_and_wrappers_come_back_as_they_are():
    lv = create_lvvit("lvvit_demo", num_classes=K)
    assert token_labeling(lv) is lv and lv.token_grid(64) == (8, 8)
    model, *_ = build("vit")
    wrapped = token_labeling(model)
    assert token_labeling(wrapped) is wrapped
    assert not is_token_labeling_model(model) and not is_token_labeling_model(VOLO([1, 1, 1, 1], num_classes=K,
                                                                                  embed_dims=[8, 16, 16, 16],
                                                                                  num_heads=[1, 1, 1, 1]))


def test_ema_copy_mixes_its_own_tokens():
    """A deep copy (timm's ModelEmaV3) mixes in its own stem: the hook is bound to the copy."""
    import copy
    model, size, grid, _, _ = build("convnext")
    wrapped = token_labeling(model).eval()
    twin = copy.deepcopy(wrapped)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
        x = images(size)
        full = (0, 0, grid[0], grid[1])
        torch.testing.assert_close(twin.forward_train(x, full)[1], twin.forward_train(x)[1].flip(0), rtol=0, atol=1e-12)


def test_dynamic_token_counts_and_missing_grids_are_one_line_errors():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=K, img_size=32, patch_size=8, depth=1, embed_dim=16,
                              num_heads=1, patch_drop_rate=0.5)
    wrapped = token_labeling(model)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="PatchDropout.*patch_drop_rate=0"):
        wrapped.train().forward_train(x)
    assert wrapped.eval().forward_train(x)[1].shape == (2, 16, K)  # no dropping in eval
    with pytest.raises(ValueError, match="NaFlex"):
        token_labeling(timm.create_model("naflexvit_base_patch16_gap", num_classes=K, depth=1, embed_dim=16,
                                         num_heads=1))
    with pytest.raises(ValueError, match="num_classes=0"):
        token_labeling(timm.create_model("test_vit", num_classes=0))
    with pytest.raises(ValueError, match="no module 'nope'"):
        token_labeling(timm.create_model("test_vit", num_classes=K), stem="nope")
    for err in (ValueError,):
        with pytest.raises(err) as info:
            token_labeling(model).forward_train(torch.randn(2, 3, 36, 32))
        assert "\n" not in str(info.value) and "multiple of 8" in str(info.value)


def test_a_stem_that_does_not_declare_its_nhwc_layout_is_named_by_stem_format():
    """PVT-v2's patch embedding returns NHWC without saying so (no ``output_fmt``): read as NCHW it fits no
    grid, which is an error naming the way out; with ``stem_format="NHWC"`` it mixes like the others."""
    model = timm.create_model("pvt_v2_b0", num_classes=K, depths=(1, 1, 1, 1)).double().eval()
    x = images((64, 64))
    with pytest.raises(ValueError, match="stem_format='NCHW'|'NHWC'"):
        token_labeling(model).forward_train(x, (0, 0, 2, 2))
    wrapped = token_labeling(model, stem_format="NHWC").eval()
    with torch.no_grad():
        cls, tokens = wrapped.forward_train(x)
        cls_mix, tokens_mix = wrapped.forward_train(x, (0, 0, 2, 2))
    torch.testing.assert_close(cls_mix, cls.flip(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens_mix, tokens.flip(0), rtol=0, atol=1e-12)


def test_train_overhead_benchmark_runs_a_wrapped_timm_model(tmp_path):
    """python -m benchmarks.train_overhead --model <timm name> (what gpu_check.sh runs for ViT-S), tiny, on CPU,
    and its rows (the timm target; no goal off the spec's GPU configuration)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "overhead.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.train_overhead", "--model", "test_vit",
                          "--img-size", "32", "--batch-size", "2", "--num-classes", "16", "--map-size", "6",
                          "--rounds", "2", "--warmup", "1", "--json", str(out), "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"cls-only", "wrapper-hard", "token-fused", "token-targets"}
    assert result["ratio_wrapper"] > 0 and result["ratio_fused"] > 0 and "grid 2x2" in run.stdout
    rows = json.loads((tmp_path / "train_overhead.json").read_text())["rows"]
    assert [r["target"] for r in rows] == ["timm-token-labeling"] * 3 and not any("goal" in r for r in rows)
    assert rows[1]["ratio"] == pytest.approx(result["ratio_fused"], rel=1e-5)
