"""Token labeling for any timm classifier: LV-ViT's training interface beside the model's own pieces.

``token_labeling(model)`` adds what token labeling needs and changes nothing the model already does:

* **MixToken** on the model's first token map (the output of its patch embedding or stem, found by
  name): inside the box, sample ``b`` takes the tokens of its partner ``B - 1 - b``. The loader's box
  is in units of the final token grid; the first map is finer by an integer factor (1 for a ViT, 8
  for Swin or ConvNeXt, 2 for VOLO), so the box is scaled by it and every final token inside the box
  is computed from partner tokens alone. A forward hook on that module does the swap, so the model's
  ``forward_features`` runs unchanged (position embeddings, prefix tokens, stages are its own).
* **Token logits** from an auxiliary linear head on ``forward_features``' per-token output on the
  final grid (the total stride, ``feature_info[-1]["reduction"]``): prefix tokens (class,
  distillation, register: ``num_prefix_tokens``) dropped, NHWC / NCHW maps flattened row-major.
  Token logits stay in mixed order: the token targets are mixed with the same box.
* **Class logits** from the model's ``forward_head`` (its pooling, norms, head dropout and head).

The wrapper's ``state_dict`` and ``named_parameters`` use the model's own names plus ``aux_head.*``,
so a plain timm checkpoint loads with only the aux head new, and the model's ``no_weight_decay`` and
``group_matcher`` apply as they are. VOLO (timm's ``volo_*``), trained with token labeling by its
authors, keeps its own ``aux_head`` and takes the class head alone as its class output (its
``forward_head`` adds the token maximum, which is this wrapper's ``forward``); its ``forward_train``,
which draws its own box, is not used.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..ops.reference import mix_box_mask, mix_boxes
from .grid import token_grid_for
from .lvvit import LVViT

__all__ = ["TokenLabeling", "token_labeling", "is_token_labeling_model"]

_PREFIX = "model."


def token_labeling(model: nn.Module, *, stem: str | None = None, stem_format: str | None = None) -> nn.Module:
    """LV-ViT's training interface for ``model`` (any timm classifier with a token grid).

    Returns a module with ``forward_train(images, mix_box=None) -> (cls_logits [B, K], token_logits
    [B, Gh*Gw, K])``, ``forward(images)`` (``cls + 0.5 * max over tokens``) and ``token_grid(img_size)``.
    An LV-ViT, or a model this already wrapped, comes back as it is. ``stem`` names the module whose
    output is mixed (default: ``patch_embed``, else ``stem``, else the module of ``feature_info[0]``);
    ``stem_format`` (``"NCHW"`` or ``"NHWC"``) says how a 4-D output is laid out where the module does not
    (timm's ``output_fmt``; default NCHW). Raises ``ValueError`` (one line) for what has no fixed token grid."""
    if isinstance(model, (LVViT, TokenLabeling)):
        return model
    return TokenLabeling(model, stem=stem, stem_format=stem_format)


def is_token_labeling_model(model: nn.Module) -> bool:
    """Whether ``model.forward_train(x, mix_box)`` is LV-ViT's: an LV-ViT or a :func:`token_labeling`
    wrapper. Having a ``forward_train`` is not enough (timm's VOLO has one with another contract)."""
    return isinstance(model, (LVViT, TokenLabeling))


class TokenLabeling(nn.Module):
    """A timm classifier with MixToken and an auxiliary token head; build it with :func:`token_labeling`.

    Attributes:
        model: the wrapped classifier (its own modules and parameters).
        stride: the total stride in pixels (one final token).
        stem_name: the module whose output MixToken swaps.
        token_head: the auxiliary token classifier (``aux_head``: the wrapper's, or VOLO's own).
    """

    def __init__(self, model: nn.Module, *, stem: str | None = None, stem_format: str | None = None):
        super().__init__()
        name = type(model).__name__
        _check_supported(model, name)
        self.model = model
        self.stride = _total_stride(model, name)
        self.stem_name, stem_module = _find_stem(model, stem, name)
        if stem_format not in (None, "NCHW", "NHWC"):
            raise ValueError(f"stem_format must be 'NCHW' or 'NHWC', got {stem_format!r}")
        self._stem_fmt = stem_format or _layout_of(stem_module, default="NCHW")
        self._feature_fmt = _layout_of(model, default="NCHW")
        self._volo = _is_volo(model)
        self._num_prefix = _num_prefix_tokens(model, self._volo)
        if self._volo and isinstance(getattr(model, "aux_head", None), nn.Linear):
            self._own_head = False  # VOLO's aux_head: keys and weights stay the model's
        else:
            self._own_head = True
            self.aux_head = _new_head(model.num_features, model.num_classes, _param_like(model))
        self._patch_dropouts = _patch_dropouts(model)
        self._mix: tuple[Any, tuple[int, int]] | None = None  # read by the stem hook during forward_train
        stem_module.register_forward_hook(self._mix_stem_output)
        self.register_state_dict_post_hook(_strip_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)

    # ---- what the trainer and timm read ----------------------------------------------------------

    @property
    def token_head(self) -> nn.Module:
        return self.aux_head if self._own_head else self.model.aux_head

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.model, "pretrained_cfg", {})

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def token_grid(self, img_size: int | tuple[int, int]) -> tuple[int, int]:
        """The token grid ``(Gh, Gw)`` for an input of ``img_size``: the image over the total stride
        (a ``ValueError`` naming the stride when it does not divide the image)."""
        return token_grid_for(img_size, self.stride, type(self.model).__name__)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.model, "no_weight_decay", None)
        return set(fn()) if callable(fn) else set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """The model's parameter groups (the aux head falls in the last group, with the head)."""
        return self.model.group_matcher(coarse)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """New class head (the model's ``reset_classifier``) and token head for ``num_classes`` (> 0)."""
        if num_classes <= 0:
            raise ValueError("token labeling needs class logits; reset_classifier(num_classes) takes num_classes > 0")
        self.model.reset_classifier(num_classes, *args, **kwargs)
        if self._own_head:
            self.aux_head = _new_head(self.model.num_features, num_classes, _param_like(self.model))

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, nn.Parameter]]:
        """The model's own names (and ``aux_head.*``), as in :meth:`state_dict`."""
        for name, param in super().named_parameters(prefix="", recurse=recurse, remove_duplicate=remove_duplicate):
            name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            yield (f"{prefix}.{name}" if prefix else name), param

    # ---- forward ---------------------------------------------------------------------------------

    def forward_train(self, x: torch.Tensor, mix_box=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cls_logits [B, K], token_logits [B, Gh*Gw, K])``.

        With ``mix_box`` (``(r1, c1, r2, c2)`` in final-grid token units, or ``[B, 4]``), the first
        token map takes the partner's tokens inside the box scaled to it; token logits are left in
        mixed order, matching targets mixed with the same box (``tl_fast.ops``)."""
        grid = self.token_grid((x.shape[-2], x.shape[-1]))
        if self.training:
            self._check_static_tokens()
        self._mix = None if mix_box is None else (mix_box, grid)
        try:
            feats = self.model.forward_features(x)
        finally:
            self._mix = None
        return self._class_logits(feats), self.token_head(self._tokens(feats, grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference logits, LV-ViT's and VOLO's rule: ``cls_logits + 0.5 * max over tokens``."""
        cls, tokens = self.forward_train(x)
        return cls + 0.5 * tokens.max(dim=1).values

    def _class_logits(self, feats: torch.Tensor) -> torch.Tensor:
        if self._volo:  # VOLO's forward_head adds its token maximum: the class head alone here
            return self.model.get_classifier()(self.model.forward_head(feats, pre_logits=True))
        out = self.model.forward_head(feats)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{type(self.model).__name__}.forward_head returned {type(out).__name__}, not logits "
                             "(a distilled model in distilled training: call set_distilled_training(False))")
        return out

    def _tokens(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Per-token features ``[B, Gh*Gw, C]`` from ``forward_features``' output, row-major."""
        gh, gw = grid
        if feats.dim() == 3:
            tokens = feats[:, self._num_prefix:]
        elif feats.dim() == 4 and self._feature_fmt == "NHWC" and feats.shape[1:3] == (gh, gw):
            tokens = feats.flatten(1, 2)
        elif feats.dim() == 4 and feats.shape[2:] == (gh, gw):
            tokens = feats.flatten(2).transpose(1, 2)
        else:
            raise ValueError(f"{type(self.model).__name__}.forward_features gave {tuple(feats.shape)}, not a "
                             f"{gh}x{gw} token map (total stride {self.stride}); token labeling needs per-token "
                             "features on the final grid")
        if tokens.shape[1] != gh * gw:
            raise ValueError(f"{type(self.model).__name__}.forward_features gave {tokens.shape[1]} tokens after "
                             f"{self._num_prefix} prefix tokens, not the {gh}x{gw} grid's {gh * gw}: token labeling "
                             "needs one token per grid cell (no token dropping or merging)")
        return tokens

    def _check_static_tokens(self) -> None:
        for name, module in self._patch_dropouts:
            if module.prob > 0:
                raise ValueError(f"{type(self.model).__name__}.{name} (PatchDropout, prob {module.prob}) drops tokens "
                                 "in training, so no token grid is left to label; build the model with "
                                 "patch_drop_rate=0")

    def _mix_stem_output(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the stem: MixToken on its output when ``forward_train`` was given a box."""
        if self._mix is None:
            return None
        mix_box, (gh, gw) = self._mix
        b = out.shape[0]
        if out.dim() == 3:  # [B, N, D] tokens, row-major over the stem's grid
            scale = _integer_scale(out.shape[1], gh * gw)
            if scale is None:
                raise self._stem_error(out, gh, gw)
            mask = mix_box_mask(mix_boxes(mix_box, b, out.device) * scale, b, (gh * scale, gw * scale))
            mask = mask.view(b, -1, 1)
        elif out.dim() == 4:
            nhwc = self._stem_fmt == "NHWC"
            h, w = (out.shape[1], out.shape[2]) if nhwc else (out.shape[2], out.shape[3])
            scale = h // gh
            if scale < 1 or h != gh * scale or w != gw * scale:
                raise self._stem_error(out, gh, gw)
            mask = mix_box_mask(mix_boxes(mix_box, b, out.device) * scale, b, (h, w))
            mask = mask.unsqueeze(-1) if nhwc else mask.unsqueeze(1)
        else:
            raise self._stem_error(out, gh, gw)
        return torch.where(mask, out.flip(0), out)

    def _stem_error(self, out: torch.Tensor, gh: int, gw: int) -> ValueError:
        return ValueError(f"{type(self.model).__name__}.{self.stem_name} gave {tuple(out.shape)} ({self._stem_fmt}), "
                          f"which is no whole multiple of the {gh}x{gw} token grid; name the module whose output is the first "
                          "token map and its layout: token_labeling(model, stem=NAME, stem_format='NCHW'|'NHWC')")


# ---- construction helpers -------------------------------------------------------------------------

def _check_supported(model: nn.Module, name: str) -> None:
    if not callable(getattr(model, "forward_features", None)) or not callable(getattr(model, "forward_head", None)):
        raise ValueError(f"{name} has no forward_features / forward_head; token labeling wraps timm classifiers")
    if type(model).__name__ == "NaFlexVit":
        raise ValueError("NaFlexVit takes variable token counts per image (NaFlex), so there is no fixed token grid "
                         "to label; use a fixed-grid ViT (vit_*)")
    if not getattr(model, "num_classes", 0):
        raise ValueError(f"{name} has no classifier (num_classes=0); build it with num_classes=K for token labeling")


def _total_stride(model: nn.Module, name: str) -> int:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"{name} has no feature_info with strides (timm's per-stage 'reduction'), so its token "
                         "grid is unknown") from None


def _find_stem(model: nn.Module, stem: str | None, name: str) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if stem is None:
        info = getattr(model, "feature_info", None) or [{}]
        candidates = ["patch_embed", "stem", info[0].get("module")]
        stem = next((c for c in candidates if c and c in modules), None)
        if stem is None:
            raise ValueError(f"{name} has no patch_embed or stem module; pass token_labeling(model, stem=NAME) "
                             "naming the module whose output is the first token map")
    elif stem not in modules:
        raise ValueError(f"{name} has no module {stem!r} (stem=)")
    return stem, modules[stem]


def _layout_of(module: nn.Module, default: str) -> str:
    """'NHWC' or 'NCHW' from a timm ``output_fmt`` (a string or timm's ``Format``)."""
    fmt = getattr(module, "output_fmt", None)
    fmt = getattr(fmt, "value", fmt)
    return fmt if fmt in ("NHWC", "NCHW") else default


def _is_volo(model: nn.Module) -> bool:
    try:
        from timm.models.volo import VOLO
    except ImportError:  # a timm without VOLO
        return False
    return isinstance(model, VOLO)


def _num_prefix_tokens(model: nn.Module, volo: bool) -> int:
    if volo:  # VOLO prepends its class token in forward_cls (post network), when it has one
        return 1 if getattr(model, "post_network", None) is not None else 0
    return int(getattr(model, "num_prefix_tokens", 0))


def _patch_dropouts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = []
    try:
        from timm.layers.patch_dropout import PatchDropout, PatchDropoutWithIndices
        kinds = [PatchDropout, PatchDropoutWithIndices]
    except ImportError:
        from timm.layers import PatchDropout
        kinds = [PatchDropout]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(kinds))]


def _param_like(model: nn.Module) -> dict:
    p = next(model.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _new_head(num_features: int, num_classes: int, factory: dict) -> nn.Linear:
    """LV-ViT's token head: a linear classifier, truncated-normal weights (std 0.02), zero bias."""
    head = nn.Linear(num_features, num_classes, **factory)
    trunc_normal_(head.weight, std=0.02, a=-0.04, b=0.04)
    nn.init.zeros_(head.bias)
    return head


def _integer_scale(n: int, cells: int) -> int | None:
    """``s`` with ``n == cells * s * s`` (a token list finer than the grid by ``s`` per side)."""
    if n % cells:
        return None
    ratio = n // cells
    s = int(round(ratio ** 0.5))
    return s if s >= 1 and s * s == ratio else None


# ---- state-dict names: the model's own --------------------------------------------------------------

def _strip_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    old = prefix + _PREFIX
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + key[len(old):]] = state_dict.pop(key)


def _add_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                      missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    own_head = prefix + "aux_head." if module._own_head else None
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if own_head is None or not key.startswith(own_head):
            state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)
