"""LV-ViT: sizes against the paper's table, inference rule, MixToken semantics, checkpoint loading, and the
timm model contract (registry, pretrained_cfg, forward_head, reset_classifier, pretrained loading)."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention, DropPath as TimmDropPath, Mlp as TimmMlp

from tl_fast.models import MODEL_NAMES, LVViT, create_lvvit, load_checkpoint, lvvit_demo, resize_pos_embed
from tl_fast.models.lvvit import Attention, DropPath, mix_tokens


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,img_size,millions", [
    ("lvvit_t", 224, 8.53), ("lvvit_s", 224, 26.15), ("lvvit_m", 224, 55.83), ("lvvit_l", 448, 150.47),
])
def test_parameter_counts_match_paper_table(name, img_size, millions):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_lvvit(name, num_classes=1000, img_size=img_size)
    assert abs(_count(model) / 1e6 - millions) / millions < 0.01
    # The published figures are given to two decimals; ours round to the same.
    assert round(_count(model) / 1e6, 2) == millions


def test_architecture_details():
    with torch.device("meta"):
        s = create_lvvit("lvvit_s")
        l_ = create_lvvit("lvvit_l")
        t = create_lvvit("lvvit_t")
    assert (len(s.blocks), s.embed_dim, s.blocks[0].attn.num_heads) == (16, 384, 6)
    assert s.blocks[0].mlp.fc1.out_features == 3 * 384
    assert s.blocks[0].attn.qkv.bias is None
    assert (s.blocks[0].skip_lam, t.blocks[0].skip_lam, l_.blocks[0].skip_lam) == (2.0, 1.0, 3.0)
    assert l_.patch_embed.conv1.out_channels == 128 and s.patch_embed.conv1.out_channels == 64
    assert s.patch_embed.proj.kernel_size == (8, 8) and s.grid == (14, 14)
    assert set(MODEL_NAMES) >= {"lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = lvvit_demo(num_classes=7, img_size=32, drop_path_rate=0.1)
    # Non-trivial BatchNorm statistics, so eval mode is not the identity.
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 32, 32))
    return m.eval()


def test_forward_is_cls_plus_half_max_token(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cls, tok = model.forward_train(x)
        out = model(x)
    assert cls.shape == (3, 7) and tok.shape == (3, 16, 7)
    torch.testing.assert_close(out, cls + 0.5 * tok.max(dim=1).values)
    assert not torch.allclose(out, cls)


def test_mixtoken_box_semantics(model):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain_cls, plain_tok = model.forward_train(x)
        # An empty box changes nothing.
        cls, tok = model.forward_train(x, torch.tensor([1, 1, 1, 3], dtype=torch.int32))
        torch.testing.assert_close(cls, plain_cls)
        # A box over the whole grid replaces every token by the partner's: the batch reversed.
        cls, tok = model.forward_train(x, torch.tensor([0, 0, 4, 4], dtype=torch.int32))
        torch.testing.assert_close(cls, plain_cls.flip(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok, plain_tok.flip(0), rtol=1e-5, atol=1e-5)
        # A partial box equals mixing the patch embedding by hand.
        box = torch.tensor([1, 0, 3, 2], dtype=torch.int32)
        emb = model.patch_embed(x)
        mixed = emb.clone()
        mixed[:, :, 1:3, 0:2] = emb.flip(0)[:, :, 1:3, 0:2]
        cls, tok = model.forward_train(x, box)
        ref = _tail(model, mixed)
        torch.testing.assert_close(cls, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok, ref[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cls, plain_cls)


def test_mixtoken_per_sample_boxes(model):
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 0, 0], [0, 0, 0, 0], [2, 2, 4, 3]], dtype=torch.int32)
    with torch.no_grad():
        plain_cls, _ = model.forward_train(x)
        cls, _ = model.forward_train(x, boxes)
    torch.testing.assert_close(cls[0], plain_cls[3], rtol=1e-5, atol=1e-5)  # full box: the partner
    torch.testing.assert_close(cls[1:3], plain_cls[1:3], rtol=1e-5, atol=1e-5)  # empty boxes
    assert not torch.allclose(cls[3], plain_cls[3])


def test_mix_tokens_map_level():
    emb = torch.arange(3 * 2 * 3 * 3, dtype=torch.float32).view(3, 2, 3, 3)
    out = mix_tokens(emb, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(out[:, :, 0:2, 1:3], emb.flip(0)[:, :, 0:2, 1:3])
    assert torch.equal(out[:, :, 2], emb[:, :, 2]) and torch.equal(out[:, :, :, 0], emb[:, :, :, 0])
    with pytest.raises(ValueError, match="mix_box"):
        mix_tokens(emb, torch.zeros(2, 4))


def _tail(model, emb):
    tokens = emb.flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(emb.shape[0], -1, -1), tokens], 1) + model.pos_embed
    for blk in model.blocks:
        tokens = blk(tokens)
    tokens = model.norm(tokens)
    return model.head(tokens[:, 0]), model.aux_head(tokens[:, 1:])


def test_attention_matches_explicit_softmax():
    torch.manual_seed(3)
    attn = Attention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).view(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    w = (q @ k.transpose(-1, -2) / math.sqrt(4)).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_load_public_layout_checkpoint_with_pos_embed_resize(model):
    # A checkpoint as saved by the public code under DDP, at another resolution, with a sequential stem.
    src = lvvit_demo(num_classes=7, img_size=48)
    state = {"module." + k: v for k, v in src.state_dict().items()}
    for i, name in ((0, "conv1"), (1, "bn1"), (3, "conv2"), (4, "bn2"), (6, "conv3"), (7, "bn3")):
        for k in [k for k in state if k.startswith(f"module.patch_embed.{name}.")]:
            state[k.replace(f"patch_embed.{name}.", f"patch_embed.conv.{i}.")] = state.pop(k)
    dst = lvvit_demo(num_classes=7, img_size=32)
    load_checkpoint(dst, {"state_dict": state})
    torch.testing.assert_close(dst.blocks[2].mlp.fc2.weight, src.blocks[2].mlp.fc2.weight)
    torch.testing.assert_close(dst.patch_embed.bn2.running_var, src.patch_embed.bn2.running_var)
    torch.testing.assert_close(dst.pos_embed, resize_pos_embed(src.pos_embed, (4, 4)))
    assert dst.pos_embed.shape == (1, 17, 96)
    # Other class count: heads are dropped, the body still loads.
    other = lvvit_demo(num_classes=3, img_size=48)
    load_checkpoint(other, src.state_dict())
    torch.testing.assert_close(other.cls_token, src.cls_token)
    with pytest.raises(RuntimeError, match="missing keys"):
        load_checkpoint(lvvit_demo(num_classes=7, img_size=48, depth=5), src.state_dict())


def test_resize_pos_embed_identity_and_smooth():
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, (4, 4)) is pe
    # A linear ramp stays (nearly) a ramp after upsampling.
    ramp = torch.linspace(0, 1, 4).view(1, 4, 1).expand(4, 4, 8).reshape(1, 16, 8)
    up = resize_pos_embed(torch.cat([torch.zeros(1, 1, 8), ramp], 1), (8, 8))
    assert up.shape == (1, 65, 8)
    cols = up[0, 1:, 0].view(8, 8)
    assert (cols[:, 1:] >= cols[:, :-1] - 1e-6).all()


def test_other_resolution_runs_with_interpolated_pos_embed(model):
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_bad_patch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="even"):
        lvvit_demo(patch_size=7, img_size=63)
    with pytest.raises(ValueError, match="unknown model"):
        create_lvvit("lvvit_xl")


def test_drop_path_drops_whole_samples():
    torch.manual_seed(4)
    dp = DropPath(0.5)
    x = torch.ones(4000, 3, 2)
    y = dp(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # a sample is kept or dropped as a whole
    assert abs(y.mean().item() - 1.0) < 0.1
    assert torch.equal(dp.eval()(x), x)


# --------------------------------------------------------------------------------------------
# LV-ViT as a timm model
# --------------------------------------------------------------------------------------------
# Importing tl_fast.models (above) registered the family.

def test_every_size_is_registered_with_timm():
    assert set(timm.list_models("lvvit*")) == set(MODEL_NAMES)
    assert {"lvvit_t", "lvvit_s", "lvvit_s_384", "lvvit_m", "lvvit_m_384", "lvvit_m_448", "lvvit_l_448",
            "lvvit_l_512", "lvvit_demo"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("name,millions,size,crop", [
    ("lvvit_s_384", 26.30, 384, 1.0), ("lvvit_m_384", 56.03, 384, 1.0), ("lvvit_m_448", 56.13, 448, 1.0),
    ("lvvit_l_448", 150.47, 448, 1.0), ("lvvit_l_512", 150.66, 512, 1.0), ("lvvit_s", 26.15, 224, 0.9),
])
def test_resolution_variants_match_paper_table(name, millions, size, crop):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert round(_count(model) / 1e6, 2) == millions
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, size, size) and cfg["crop_pct"] == crop
    assert model.grid == (size // 16, size // 16)


def test_create_model_passes_arguments_and_uses_timm_layers():
    model = timm.create_model("lvvit_demo", num_classes=3, drop_path_rate=0.2)
    assert isinstance(model, LVViT) and model.num_classes == 3 and model.head.out_features == 3
    assert model.aux_head.out_features == 3
    assert model.blocks[-1].drop_path.drop_prob == pytest.approx(0.2) and isinstance(model.blocks[0].drop_path,
                                                                                  torch.nn.Identity)
    blk = model.blocks[1]
    assert isinstance(blk.attn, TimmAttention) and isinstance(blk.mlp, TimmMlp)
    assert isinstance(blk.drop_path, TimmDropPath) and blk.attn.qkv.bias is None
    assert blk.attn.scale == pytest.approx(blk.attn.head_dim ** -0.5)
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("lvvit_xl")


def test_pretrained_cfg_and_data_config():
    model = timm.create_model("lvvit_demo")
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg and cfg["architecture"] == "lvvit_demo"
    assert cfg["input_size"] == (3, 64, 64) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["first_conv"] == "patch_embed.conv1" and tuple(cfg["classifier"]) == ("head", "aux_head")
    model.get_submodule(cfg["first_conv"])
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 64, 64)
    # A model built at another resolution reports its own input size.
    other = timm.create_model("lvvit_demo", img_size=96)
    assert timm.data.resolve_data_config(model=other)["input_size"] == (3, 96, 96)
    assert create_lvvit("lvvit_s", img_size=384).pretrained_cfg["input_size"] == (3, 384, 384)
    with torch.device("meta"):
        assert timm.data.resolve_data_config(model=timm.create_model("lvvit_m"))["crop_pct"] == 1.0


def test_forward_head_and_features(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 17, 96)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 0])
        cls, tok = model.forward_train(x)
        torch.testing.assert_close(model.forward_head(feats), cls + 0.5 * tok.max(dim=1).values)
        torch.testing.assert_close(model(x), model.forward_head(feats))
    assert model.get_classifier() is model.head


def test_num_classes_zero_gives_features_and_reset_classifier():
    torch.manual_seed(5)
    model = timm.create_model("lvvit_demo", num_classes=0, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_features) == (2, 96)
        torch.testing.assert_close(out, model.forward_features(x)[:, 0])
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.head.out_features == model.aux_head.out_features == 4
    with torch.no_grad():
        cls, tok = model.forward_train(x)
        assert model(x).shape == (2, 4) and tok.shape == (2, 16, 4)
    model.reset_classifier(0)
    assert isinstance(model.aux_head, torch.nn.Identity) and model(x).shape == (2, 96)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="avg")


def test_pretrained_without_weights_is_timms_error():
    with pytest.raises(RuntimeError, match="No pretrained weights exist for lvvit_demo"):
        timm.create_model("lvvit_demo", pretrained=True)


def _public_layout(state):
    """A state dict as the public code saves it under DDP: ``module.`` prefix, inside {"state_dict": ...}."""
    return {"state_dict": {"module." + k: v for k, v in state.items()}}


def test_pretrained_from_a_local_file_the_timm_way(tmp_path, model):
    path = tmp_path / "lvvit_demo_public.pth"
    torch.save(_public_layout(model.state_dict()), path)
    x = torch.randn(2, 3, 32, 32)
    loaded = timm.create_model("lvvit_demo", pretrained=True, num_classes=7, img_size=32,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=7)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # Another class count (the timm fine-tuning idiom): heads start fresh, the body is the checkpoint's.
    tuned = timm.create_model("lvvit_demo", pretrained=True, num_classes=3, img_size=48,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=7))
    torch.testing.assert_close(tuned.blocks[3].mlp.fc1.weight, model.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(tuned.pos_embed, resize_pos_embed(model.pos_embed, (6, 6)))
    assert tuned.head.out_features == 3


def test_grad_checkpointing_computes_the_same(model):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    m = lvvit_demo(num_classes=7, img_size=32)
    m.load_state_dict(model.state_dict())
    m.eval()
    plain = m(x)
    (g_plain,) = torch.autograd.grad(plain.sum(), x)
    m.set_grad_checkpointing(True)
    ckpt = m(x)
    (g_ckpt,) = torch.autograd.grad(ckpt.sum(), x)
    torch.testing.assert_close(ckpt, plain)
    torch.testing.assert_close(g_ckpt, g_plain)


def test_layer_decay_groups_through_timm_optimizer_factory():
    from timm.optim import create_optimizer_v2

    model = timm.create_model("lvvit_demo", num_classes=3)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == len(model.blocks) + 2  # stem, each block, then norm and heads
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == _count(model)


def test_forward_intermediates_and_features_only(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=2)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(maps) == 2 and maps[0].shape == (2, 96, 4, 4)
        # The last block's map is its patch tokens, laid out on the token grid (row-major).
        tokens = model.forward_intermediates(x, indices=[3], output_fmt="NLC", norm=True, intermediates_only=True)
        torch.testing.assert_close(tokens[0], final[:, 1:])
        torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), model.forward_intermediates(
            x, indices=[3], output_fmt="NLC", intermediates_only=True)[0])
        feats = timm.create_model("lvvit_demo", features_only=True, out_indices=(1, 3), img_size=32).eval()
        out = feats(x)
    assert [tuple(t.shape) for t in out] == [(2, 96, 4, 4)] * 2
    assert feats.feature_info.channels() == [96, 96] and feats.feature_info.reduction() == [8, 8]
