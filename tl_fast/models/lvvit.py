"""LV-ViT: vision transformers trained with token labeling, as a timm model family.

Paper: "All Tokens Matter: Token Labeling for Training Better Vision Transformers", Jiang et al.,
NeurIPS 2021 (https://arxiv.org/abs/2104.10858).

What sets LV-ViT apart from a plain ViT:

* a 4-layer convolutional patch embedding (7x7 stride-2 conv and two 3x3 convs, each with
  BatchNorm and ReLU, then a ``patch/2`` strided projection), instead of one ``patch x patch`` conv;
* residual branches scaled by ``1 / skip_lam`` (``x + f(x) / skip_lam``);
* MLP ratio 3 and no bias on the qkv projection;
* an auxiliary head on every patch token, trained against the token labels;
* MixToken: right after the patch embedding, the tokens inside a box are taken from the partner
  sample (the batch reversed); the token targets follow the same box (:mod:`tl_fast.ops`);
* inference predicts ``cls_logits + 0.5 * max over tokens of token_logits``.

Importing :mod:`tl_fast.models` registers every size with timm, so ``timm.create_model("lvvit_s")``
works like any timm model (``pretrained_cfg``, ``forward_features`` / ``forward_head``,
``reset_classifier``, ``num_classes=0`` for features, ``forward_intermediates`` / ``features_only``). Attention, MLP, stochastic depth, the
truncated-normal init and position-embedding resampling are timm's layers; only what timm lacks is
here: the convolutional stem, the scaled-residual block, MixToken and the token head.

Unlike the public implementation, :meth:`LVViT.forward_train` does not un-mix the token logits:
token ``(b, t)`` inside the box is predicted against the partner's target at ``t``, which is what
``tl_fast.ops.token_targets(..., mix_box=...)`` produces. Both conventions give the same loss (the
batch flip inside the box is a bijection), this one needs no second gather.

Parameter counts (``num_classes=1000``): T 8.53M, S 26.15M, M 55.83M at 224 px; L 150.47M at 448 px
(150.02M at 224 px), the figures of the public model table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, DropPath, Mlp, resample_abs_pos_embed, to_2tuple
from timm.layers import trunc_normal_ as _timm_trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..ops.reference import mix_box_mask
from .grid import token_grid_for

__all__ = [
    "LVViT", "ConvPatchEmbed", "Block", "Attention", "Mlp", "DropPath", "default_cfgs", "checkpoint_filter_fn",
    "resize_pos_embed", "load_checkpoint", "create_lvvit", "MODEL_NAMES",
]  # register_model appends every registered builder name


# --------------------------------------------------------------------------------------------
# Blocks (timm provides Attention, Mlp, DropPath; these are what it lacks)
# --------------------------------------------------------------------------------------------

def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at two standard deviations (timm's initializer, bounds in std units)."""
    return _timm_trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class ConvPatchEmbed(nn.Module):
    """LV-ViT's convolutional patch embedding: ``[B, 3, H, W] -> [B, D, H/p, W/p]``.

    Three conv-BN-ReLU layers (7x7 stride 2, then two 3x3 stride 1) at ``stem_dim`` channels halve
    the resolution; a ``p/2 x p/2`` conv with stride ``p/2`` projects to the embedding dimension.

    Args:
        img_size: training resolution (an int for square, or ``(H, W)``); sets ``grid_size``.
        patch_size: total downsampling; must be even.
        in_chans: input channels.
        embed_dim: output channels (the transformer width).
        stem_dim: channels of the three stem convolutions (64; 128 for LV-ViT-L).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 384, stem_dim: int = 64):
        super().__init__()
        if patch_size % 2 or patch_size < 2:
            raise ValueError(f"patch_size must be even (the stem halves the image first); got {patch_size}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.grid = self.grid_size  # tl_fast's name
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.conv1 = nn.Conv2d(in_chans, stem_dim, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        half = patch_size // 2
        self.proj = nn.Conv2d(stem_dim, embed_dim, kernel_size=half, stride=half)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an input of ``img_size`` (any multiple of the patch size)."""
        return img_size[0] // self.patch_size, img_size[1] // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of patch size {self.patch_size}")
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block with LV-ViT's residual scaling: ``x + drop_path(f(norm(x))) / skip_lam``.

    timm's ``Block`` has no such scaling (its LayerScale is a learned parameter, not a constant), so
    the block is LV-ViT's own; its attention and MLP are timm's."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, skip_lam: float = 1.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


# --------------------------------------------------------------------------------------------
# MixToken
# --------------------------------------------------------------------------------------------

def mix_tokens(x: torch.Tensor, mix_box) -> torch.Tensor:
    """MixToken on a patch-embedding map ``[B, D, Gh, Gw]``: inside the box, sample ``b`` takes the
    tokens of its partner ``B - 1 - b``."""
    b, _, gh, gw = x.shape
    mask = mix_box_mask(mix_box, b, (gh, gw), x.device).unsqueeze(1)
    return torch.where(mask, x.flip(0), x)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class LVViT(nn.Module):
    """LV-ViT.

    Args:
        img_size: training resolution (an int, or ``(H, W)``); sets the position-embedding grid.
            Other resolutions (multiples of ``patch_size``) run with the embedding resampled.
        patch_size: token size in pixels (even).
        in_chans: input channels.
        num_classes: classes of both heads; 0 removes them (``forward`` then returns features).
        global_pool: ``"token"`` (the class token; LV-ViT's only pooling).
        embed_dim: transformer width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: bias on the qkv projection (LV-ViT: none).
        skip_lam: residual branches are divided by this (1 for T, 2 for S/M, 3 for L).
        stem_dim: channels of the convolutional stem (64; 128 for L).
        drop_rate: dropout after the position embedding, in the MLP and projections.
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 384, depth: int = 16,
                 num_heads: int = 6, mlp_ratio: float = 3.0, qkv_bias: bool = False, skip_lam: float = 2.0,
                 stem_dim: int = 64, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim, stem_dim)
        self.grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Linear stochastic-depth rule in Python floats (timm's helper rounds the rates to float32).
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], skip_lam)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.aux_head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm model contract ----------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay besides norms and biases (see :mod:`tl_fast.train`)."""
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, for timm's layer-wise learning-rate decay."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The class-token head (the token head, ``aux_head``, is reset along with it)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New heads (class and token) for ``num_classes``; 0 removes both."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        for name in ("head", "aux_head"):
            head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self._init_weights(head)
            setattr(self, name, head.to(self.cls_token.device, self.cls_token.dtype))

    def token_grid(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """The token grid ``(Gh, Gw)`` for an input of ``img_size`` (the image over the patch size)."""
        return token_grid_for(img_size, self.patch_embed.patch_size, type(self).__name__)

    # ---- forward ----------------------------------------------------------------------------

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.grid)

    def _tokens(self, x: torch.Tensor, mix_box=None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch embedding (MixToken if ``mix_box``), class token, position embedding: ``[B, 1 + T, D]``."""
        x = self.patch_embed(x)
        grid = (x.shape[2], x.shape[3])
        if mix_box is not None:
            x = mix_tokens(x, mix_box)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self._pos_embed(grid)), grid

    def forward_features(self, x: torch.Tensor, mix_box=None) -> torch.Tensor:
        """Normalized tokens ``[B, 1 + Gh*Gw, D]`` (class token first); MixToken if ``mix_box`` is given."""
        x, _ = self._tokens(x, mix_box)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature interface (``features_only=True`` builds on it): the patch tokens
        after the blocks in ``indices`` (last n if an int), as ``[B, D, Gh, Gw]`` maps (``"NCHW"``) or
        ``[B, Gh*Gw, D]`` (``"NLC"``); with ``norm`` through the final LayerNorm. Returns the maps, or
        ``(forward_features output, maps)`` unless ``intermediates_only``."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x, (gh, gw) = self._tokens(x)
        b = x.shape[0]
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take_indices:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]
                intermediates.append(y.transpose(1, 2).reshape(b, -1, gh, gw) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and optionally the norm and heads)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens from :meth:`forward_features` to the inference logits
        ``cls_logits + 0.5 * max over tokens of token_logits``; with ``pre_logits`` (or
        ``num_classes=0``) the class-token features ``[B, D]``."""
        if pre_logits or self.num_classes == 0:
            return x[:, 0]
        return self.head(x[:, 0]) + 0.5 * self.aux_head(x[:, 1:]).max(dim=1).values

    def forward_train(self, x: torch.Tensor, mix_box=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls_logits [B, K], token_logits [B, Gh*Gw, K])``.

        With ``mix_box`` (``(r1, c1, r2, c2)`` in token units, or ``[B, 4]``), tokens inside the box
        come from the partner ``B - 1 - b``; token logits are left in mixed order, matching targets
        mixed with the same box."""
        x = self.forward_features(x, mix_box)
        return self.head(x[:, 0]), self.aux_head(x[:, 1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference logits: ``cls_logits + 0.5 * max over tokens of token_logits``
        (class-token features when ``num_classes=0``)."""
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool != "token":
        raise ValueError(f"LV-ViT pools with its class token; global_pool must be 'token', got {global_pool!r}")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
                     ) -> torch.Tensor:
    """Bicubic resize of a ``[1, 1 + Gh*Gw, D]`` position embedding to ``new_grid`` (class token kept).

    timm's ``resample_abs_pos_embed`` without antialiasing (LV-ViT's public code resizes that way),
    plus a clear error when the old grid is not square and not given."""
    n = pos_embed.shape[1] - 1
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"cannot infer the grid of a position embedding with {n} patch positions; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)


# Names that differ between other LV-ViT checkpoint layouts and this module (prefix rewrites).
_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("module.", ""),  # DistributedDataParallel
    ("_orig_mod.", ""),  # torch.compile
    ("patch_embed.conv.0.", "patch_embed.conv1."),  # sequential stems
    ("patch_embed.conv.1.", "patch_embed.bn1."),
    ("patch_embed.conv.3.", "patch_embed.conv2."),
    ("patch_embed.conv.4.", "patch_embed.bn2."),
    ("patch_embed.conv.6.", "patch_embed.conv3."),
    ("patch_embed.conv.7.", "patch_embed.bn3."),
)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: LVViT) -> dict[str, torch.Tensor]:
    """Map a public LV-ViT (or tl_fast / DDP / EMA) checkpoint onto ``model``'s keys.

    timm calls this for ``pretrained=True``. It unwraps ``{"model": ...}``/``{"state_dict": ...}``/
    ``{"state_dict_ema": ...}`` containers, strips wrapper prefixes, resizes the position embedding
    to the model's grid, and drops both heads when their class count differs from the model's
    (fine-tuning on another label set, or ``num_classes=0``)."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        for old, new in _KEY_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resize_pos_embed(v, model.grid)
        if k.startswith(("head.", "aux_head.")) and v.shape[0] != model.num_classes:
            continue
        out[k] = v
    return out


def load_checkpoint(model: LVViT, path_or_state, *, strict: bool = True) -> LVViT:
    """Load a checkpoint (a path or a state dict) through :func:`checkpoint_filter_fn`.

    With ``strict``, every key except heads dropped for a class-count change must match."""
    state = torch.load(path_or_state, map_location="cpu", weights_only=True) if isinstance(path_or_state, str) \
        else path_or_state
    filtered = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    heads_dropped = not any(k.startswith("head.") for k in filtered)
    missing = [k for k in missing if not (heads_dropped and k.startswith(("head.", "aux_head.")))]
    if strict and (missing or unexpected):
        raise RuntimeError(f"checkpoint does not match {type(model).__name__}: missing keys {missing[:8]}, "
                           f"unexpected keys {unexpected[:8]} (is it the right LV-ViT size?)")
    return model


# --------------------------------------------------------------------------------------------
# Configurations and builders
# --------------------------------------------------------------------------------------------

_RELEASES = "https://github.com/zihangJiang/TokenLabeling/releases/download"


def _cfg(origin: str = "", **kwargs: Any) -> dict[str, Any]:
    """timm pretrained config. No weights ship with tl_fast (``url`` stays empty, so ``pretrained=True``
    alone gives timm's "No pretrained weights exist" error); ``origin_url`` names the public file to
    pass as ``pretrained_cfg_overlay=dict(file=...)``."""
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.conv1", "classifier": ("head", "aux_head"),
        "license": "apache-2.0", "paper_ids": "arXiv:2104.10858",
        "paper_name": "All Tokens Matter: Token Labeling for Training Better Vision Transformers",
        "origin_url": f"{_RELEASES}/{origin}" if origin else "https://github.com/zihangJiang/TokenLabeling",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "lvvit_t": _cfg("v0.2.0/lvvit_t.pth"),
    "lvvit_s": _cfg("1.0/lvvit_s-26M-224-83.3.pth.tar"),
    "lvvit_s_384": _cfg("1.0/lvvit_s-26M-384-84.4.pth.tar", input_size=(3, 384, 384), crop_pct=1.0),
    "lvvit_m": _cfg("1.0/lvvit_m-56M-224-84.0.pth.tar", crop_pct=1.0),
    "lvvit_m_384": _cfg("1.0/lvvit_m-56M-384-85.4.pth.tar", input_size=(3, 384, 384), crop_pct=1.0),
    "lvvit_m_448": _cfg("1.0/lvvit_m-56M-448-85.5.pth.tar", input_size=(3, 448, 448), crop_pct=1.0),
    # LV-ViT-L's public weights are at 448 and 512 px; lvvit_l itself is the 224 px architecture.
    "lvvit_l": _cfg(crop_pct=1.0),
    "lvvit_l_448": _cfg("1.0/lvvit_l-150M-448-86.2.pth.tar", input_size=(3, 448, 448), crop_pct=1.0),
    "lvvit_l_512": _cfg("1.0/lvvit_l-150M-512-86.4.pth.tar", input_size=(3, 512, 512), crop_pct=1.0),
    "lvvit_demo": _cfg(input_size=(3, 64, 64), origin_url=None, paper_ids=None, paper_name=None,
                       notes=("tl_fast's CPU-sized LV-ViT for demos and tests; not in the paper",)),
})


@dataclass(frozen=True)
class _Arch:
    embed_dim: int
    depth: int
    num_heads: int
    skip_lam: float
    stem_dim: int = 64
    patch_size: int = 16
    img_size: int = 224


_T, _S, _M = _Arch(240, 12, 4, 1.0), _Arch(384, 16, 6, 2.0), _Arch(512, 20, 8, 2.0)
_L = _Arch(768, 24, 12, 3.0, stem_dim=128)
_ARCHS: dict[str, _Arch] = {
    "lvvit_t": _T,
    "lvvit_s": _S, "lvvit_s_384": _Arch(**{**_S.__dict__, "img_size": 384}),
    "lvvit_m": _M, "lvvit_m_384": _Arch(**{**_M.__dict__, "img_size": 384}),
    "lvvit_m_448": _Arch(**{**_M.__dict__, "img_size": 448}),
    "lvvit_l": _L, "lvvit_l_448": _Arch(**{**_L.__dict__, "img_size": 448}),
    "lvvit_l_512": _Arch(**{**_L.__dict__, "img_size": 512}),
    # Not in the paper: a CPU-sized LV-ViT for demos and tests (64-96 px images, 8 px patches).
    "lvvit_demo": _Arch(96, 4, 3, 1.0, stem_dim=24, patch_size=8, img_size=64),
}
MODEL_NAMES = tuple(_ARCHS)


def _create_lvvit(variant: str, pretrained: bool = False, **kwargs: Any) -> LVViT:
    """timm's builder with this size's architecture; keyword arguments override it."""
    arch = _ARCHS[variant]
    args: dict[str, Any] = dict(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
                                skip_lam=arch.skip_lam, stem_dim=arch.stem_dim, patch_size=arch.patch_size,
                                img_size=arch.img_size)
    out_indices = kwargs.pop("out_indices", 3)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if kwargs.get("img_size") is not None:
        # The config describes this model's input (what resolve_data_config reads); the channel
        # count stays the checkpoint's, so timm can still adapt a pretrained stem to in_chans.
        chans = default_cfgs[variant].default.input_size[0]
        overlay.setdefault("input_size", (chans, *to_2tuple(kwargs["img_size"])))
    args.update(kwargs)
    return build_model_with_cfg(LVViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                pretrained_cfg_overlay=overlay or None,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


def create_lvvit(name: str, pretrained: bool = False, **kwargs: Any) -> LVViT:
    """Build ``name`` (one of :data:`MODEL_NAMES`) through ``timm.create_model``; keyword arguments
    override the architecture (e.g. ``depth=6, embed_dim=128``) or set ``num_classes``,
    ``img_size``, ``drop_path_rate``, ..."""
    import timm

    if name not in _ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


@register_model
def lvvit_t(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-T: depth 12, width 240, 4 heads (8.53M parameters at 224 px)."""
    return _create_lvvit("lvvit_t", pretrained, **kwargs)


@register_model
def lvvit_s(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-S: depth 16, width 384, 6 heads (26.15M parameters at 224 px)."""
    return _create_lvvit("lvvit_s", pretrained, **kwargs)


@register_model
def lvvit_s_384(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-S at 384 px (26.30M parameters)."""
    return _create_lvvit("lvvit_s_384", pretrained, **kwargs)


@register_model
def lvvit_m(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-M: depth 20, width 512, 8 heads (55.83M parameters at 224 px)."""
    return _create_lvvit("lvvit_m", pretrained, **kwargs)


@register_model
def lvvit_m_384(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-M at 384 px (56.03M parameters)."""
    return _create_lvvit("lvvit_m_384", pretrained, **kwargs)


@register_model
def lvvit_m_448(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-M at 448 px (56.13M parameters)."""
    return _create_lvvit("lvvit_m_448", pretrained, **kwargs)


@register_model
def lvvit_l(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-L: depth 24, width 768, 12 heads, 128-channel stem (150.02M parameters at 224 px;
    the public weights are ``lvvit_l_448`` and ``lvvit_l_512``)."""
    return _create_lvvit("lvvit_l", pretrained, **kwargs)


@register_model
def lvvit_l_448(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-L at 448 px (150.47M parameters)."""
    return _create_lvvit("lvvit_l_448", pretrained, **kwargs)


@register_model
def lvvit_l_512(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """LV-ViT-L at 512 px (150.66M parameters)."""
    return _create_lvvit("lvvit_l_512", pretrained, **kwargs)


@register_model
def lvvit_demo(pretrained: bool = False, **kwargs: Any) -> LVViT:
    """A CPU-sized LV-ViT for demos and tests: depth 4, width 96, 3 heads, 8 px patches, 64 px images."""
    return _create_lvvit("lvvit_demo", pretrained, **kwargs)
