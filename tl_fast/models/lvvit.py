"""LV-ViT: vision transformers trained with token labeling.

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

from ..ops.reference import mix_box_mask

__all__ = [
    "LVViT", "ConvPatchEmbed", "Block", "Attention", "Mlp", "default_cfgs", "checkpoint_filter_fn",
    "resize_pos_embed", "load_checkpoint", "create_lvvit", "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l",
    "lvvit_demo", "MODEL_NAMES",
]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------

def trunc_normal_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at two standard deviations (the ViT initialization)."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``p``, rescale the rest."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class ConvPatchEmbed(nn.Module):
    """LV-ViT's convolutional patch embedding: ``[B, 3, H, W] -> [B, D, H/p, W/p]``.

    Three conv-BN-ReLU layers (7x7 stride 2, then two 3x3 stride 1) at ``stem_dim`` channels halve
    the resolution; a ``p/2 x p/2`` conv with stride ``p/2`` projects to the embedding dimension.

    Args:
        img_size: training resolution (square), used only to report ``grid``/``num_patches``.
        patch_size: total downsampling; must be even.
        in_chans: input channels.
        embed_dim: output channels (the transformer width).
        stem_dim: channels of the three stem convolutions (64; 128 for LV-ViT-L).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_dim: int = 64):
        super().__init__()
        if patch_size % 2 or patch_size < 2:
            raise ValueError(f"patch_size must be even (the stem halves the image first); got {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.conv1 = nn.Conv2d(in_chans, stem_dim, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_dim)
        self.conv2 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_dim)
        self.conv3 = nn.Conv2d(stem_dim, stem_dim, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_dim)
        half = patch_size // 2
        self.proj = nn.Conv2d(stem_dim, embed_dim, kernel_size=half, stride=half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of patch size {self.patch_size}")
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient
    kernels on GPU)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """Two-layer GELU MLP."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with LV-ViT's residual scaling: ``x + drop_path(f(norm(x))) / skip_lam``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, skip_lam: float = 1.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm):
        super().__init__()
        self.skip_lam = skip_lam
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

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
        img_size: training resolution (square); sets the position-embedding grid.
        patch_size: token size in pixels (even).
        in_chans: input channels.
        num_classes: classes of both heads.
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

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 16, num_heads: int = 6, mlp_ratio: float = 3.0,
                 qkv_bias: bool = False, skip_lam: float = 2.0, stem_dim: int = 64, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = ConvPatchEmbed(img_size, patch_size, in_chans, embed_dim, stem_dim)
        self.grid = self.patch_embed.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth rule
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], skip_lam)
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.aux_head = nn.Linear(embed_dim, num_classes)
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

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay besides norms and biases (see :mod:`tl_fast.train`)."""
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.grid)

    def forward_features(self, x: torch.Tensor, mix_box=None) -> torch.Tensor:
        """Normalized tokens ``[B, 1 + Gh*Gw, D]`` (class token first); MixToken if ``mix_box`` is given."""
        x = self.patch_embed(x)
        grid = (x.shape[2], x.shape[3])
        if mix_box is not None:
            x = mix_tokens(x, mix_box)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self._pos_embed(grid))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_train(self, x: torch.Tensor, mix_box=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls_logits [B, K], token_logits [B, Gh*Gw, K])``.

        With ``mix_box`` (``(r1, c1, r2, c2)`` in token units, or ``[B, 4]``), tokens inside the box
        come from the partner ``B - 1 - b``; token logits are left in mixed order, matching targets
        mixed with the same box."""
        x = self.forward_features(x, mix_box)
        return self.head(x[:, 0]), self.aux_head(x[:, 1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference logits: ``cls_logits + 0.5 * max over tokens of token_logits``."""
        cls_logits, token_logits = self.forward_train(x)
        return cls_logits + 0.5 * token_logits.max(dim=1).values


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
                     ) -> torch.Tensor:
    """Bicubic resize of a ``[1, 1 + Gh*Gw, D]`` position embedding to ``new_grid`` (class token kept)."""
    n = pos_embed.shape[1] - 1
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"cannot infer the grid of a position embedding with {n} patch positions; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


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

    Unwraps ``{"model": ...}``/``{"state_dict": ...}``/``{"state_dict_ema": ...}`` containers, strips
    wrapper prefixes, resizes the position embedding to the model's grid, and drops both heads when
    their class count differs from the model's (fine-tuning on another label set)."""
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

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "classifier": ("head", "aux_head"),
        **kwargs,
    }


default_cfgs: dict[str, dict[str, Any]] = {
    "lvvit_t": _cfg(),
    "lvvit_s": _cfg(),
    "lvvit_m": _cfg(crop_pct=1.0),
    "lvvit_l": _cfg(crop_pct=1.0, input_size=(3, 448, 448)),
    "lvvit_demo": _cfg(input_size=(3, 64, 64)),
}


@dataclass(frozen=True)
class _Arch:
    embed_dim: int
    depth: int
    num_heads: int
    skip_lam: float
    stem_dim: int = 64
    patch_size: int = 16
    img_size: int = 224


_ARCHS: dict[str, _Arch] = {
    "lvvit_t": _Arch(240, 12, 4, 1.0),
    "lvvit_s": _Arch(384, 16, 6, 2.0),
    "lvvit_m": _Arch(512, 20, 8, 2.0),
    "lvvit_l": _Arch(768, 24, 12, 3.0, stem_dim=128),
    # Not in the paper: a CPU-sized LV-ViT for demos and tests (64-96 px images, 8 px patches).
    "lvvit_demo": _Arch(96, 4, 3, 1.0, stem_dim=24, patch_size=8, img_size=64),
}
MODEL_NAMES = tuple(_ARCHS)


def create_lvvit(name: str, **kwargs: Any) -> LVViT:
    """Build ``name`` (one of :data:`MODEL_NAMES`); keyword arguments override the architecture
    (e.g. ``depth=6, embed_dim=128``) or set ``num_classes``, ``img_size``, ``drop_path_rate``, ..."""
    if name not in _ARCHS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    arch = _ARCHS[name]
    args: dict[str, Any] = dict(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads,
                                skip_lam=arch.skip_lam, stem_dim=arch.stem_dim, patch_size=arch.patch_size,
                                img_size=arch.img_size)
    args.update(kwargs)
    model = LVViT(**args)
    model.default_cfg = dict(default_cfgs[name], num_classes=model.num_classes,
                             input_size=(3, args["img_size"], args["img_size"]))
    return model


def lvvit_t(**kwargs: Any) -> LVViT:
    """LV-ViT-T: depth 12, width 240, 4 heads (8.53M parameters at 224 px)."""
    return create_lvvit("lvvit_t", **kwargs)


def lvvit_s(**kwargs: Any) -> LVViT:
    """LV-ViT-S: depth 16, width 384, 6 heads (26.15M parameters at 224 px)."""
    return create_lvvit("lvvit_s", **kwargs)


def lvvit_m(**kwargs: Any) -> LVViT:
    """LV-ViT-M: depth 20, width 512, 8 heads (55.83M parameters at 224 px)."""
    return create_lvvit("lvvit_m", **kwargs)


def lvvit_l(**kwargs: Any) -> LVViT:
    """LV-ViT-L: depth 24, width 768, 12 heads, 128-channel stem (150.02M parameters at 224 px,
    150.47M at 448 px, the public checkpoint's resolution: pass ``img_size=448`` to load it as is)."""
    return create_lvvit("lvvit_l", **kwargs)


def lvvit_demo(**kwargs: Any) -> LVViT:
    """A CPU-sized LV-ViT for demos and tests: depth 4, width 96, 3 heads, 8 px patches, 64 px images."""
    return create_lvvit("lvvit_demo", **kwargs)
