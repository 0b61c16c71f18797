"""Dense prediction: a classifier with its global pooling removed and its head applied per position.

Dense prediction, by model interface:

* timm models (``forward_features`` / ``forward_head``): the model's own head is applied to each
  position of the pre-pool features as a batch of 1 x 1 "images" (channels-first, channels-last or
  token layouts). Pooling a single position is the identity, so a plain linear head is exactly a
  1 x 1 convolution over the feature map, and heads with a pre-logits norm / MLP / conv (ConvNeXt,
  EfficientNet, MobileNetV3, ...) apply it per position too. Token models (ViT, DeiT, EVA, ...) drop
  their prefix (class, distillation, register) tokens and reshape the patch tokens to the patch grid.
* torchvision-style models with an ``avgpool`` global pool and an ``fc`` / ``classifier`` / ``head``
  module: the features entering ``avgpool`` are captured and the head applied per position.
* any model with ``forward_dense(x) -> (dense [B, K, h, w], logits [B, K])``.

The image-level prediction (used for the accuracy report) is the model's normal pooled output.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


def _fmt_of(model: nn.Module) -> str:
    fmt = getattr(model, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))


class DenseClassifier(nn.Module):
    """``forward(x) -> (dense_logits [B, K, h, w], image_logits [B, K])`` for a classifier.

    See the module docstring for the supported interfaces. ``forward`` is :meth:`backbone` (the
    model's own pass) then :meth:`dense_head` (its classifier at every position), so the two can
    be timed apart. ``rows_per_chunk`` bounds the number of positions passed through the head at
    once (memory)."""

    def __init__(self, model: nn.Module, rows_per_chunk: int = 32768):
        super().__init__()
        self.model = model
        self.rows_per_chunk = int(rows_per_chunk)
        if callable(getattr(model, "forward_dense", None)):
            self.mode = "dense"
        elif callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
            self.mode = "timm"
        else:
            self.head = next((getattr(model, n) for n in ("fc", "classifier", "head")
                              if isinstance(getattr(model, n, None), nn.Module)), None)
            if not isinstance(getattr(model, "avgpool", None), nn.Module) or self.head is None:
                raise TypeError(
                    f"cannot make {type(model).__name__} dense: give a timm model (forward_features/"
                    "forward_head), a torchvision-style model with `avgpool` and `fc`/`classifier`/`head`, "
                    "or a model with forward_dense(x) -> (dense [B,K,h,w], logits [B,K])")
            self.mode = "hooked"
            # A head that flattens by itself (torchvision ConvNeXt: LayerNorm2d, Flatten, Linear)
            # takes [N, C, 1, 1]; others take the flattened [N, C].
            self._head_4d = any(isinstance(m, nn.Flatten) for m in self.head.modules())

    def _per_position(self, head: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor,
                      shape: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Apply ``head`` to each row of ``rows`` [N, C] (reshaped by ``shape``) -> [N, K]."""
        out = [head(shape(rows[i:i + self.rows_per_chunk])) for i in range(0, rows.shape[0], self.rows_per_chunk)]
        return torch.cat(out, 0)

    def _token_grid(self, n_tokens: int, x: torch.Tensor) -> tuple[int, int]:
        pe = getattr(self.model, "patch_embed", None)
        grid = None
        if pe is not None and callable(getattr(pe, "dynamic_feat_size", None)):
            grid = tuple(pe.dynamic_feat_size(tuple(x.shape[-2:])))
        elif pe is not None and getattr(pe, "grid_size", None) is not None:
            grid = tuple(pe.grid_size)
        if grid is None or grid[0] * grid[1] != n_tokens:
            side = math.isqrt(n_tokens)
            if side * side != n_tokens:
                raise ValueError(f"{type(self.model).__name__}: {n_tokens} patch tokens do not form a known "
                                 "grid; give a model with patch_embed.grid_size or a square grid")
            grid = (side, side)
        return int(grid[0]), int(grid[1])

    def backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own forward: ``(pre-pool features, image logits [B, K])``; for a
        ``forward_dense`` model, its ``(dense, logits)``."""
        m = self.model
        if self.mode == "dense":
            return m.forward_dense(x)
        if self.mode == "hooked":
            captured: list[torch.Tensor] = []
            handle = m.avgpool.register_forward_hook(lambda _m, inp, out: captured.append(inp[0]))
            try:
                logits = m(x)
            finally:
                handle.remove()
            return captured[-1], logits
        feats = m.forward_features(x)
        return feats, m.forward_head(feats)

    def dense_head(self, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The classifier applied at every position of ``feats`` (from :meth:`backbone` on ``x``):
        ``[B, K, h, w]``."""
        m = self.model
        if self.mode == "dense":
            return feats
        if self.mode == "hooked":
            if m.avgpool(feats).shape[-2:] != (1, 1):
                raise TypeError(f"{type(m).__name__}.avgpool is not a global pool; cannot make it dense")
            b, c, h, w = feats.shape
            rows = feats.permute(0, 2, 3, 1).reshape(-1, c)
            shape = (lambda r: r[:, :, None, None]) if self._head_4d else (lambda r: r)
            dense = self._per_position(self.head, rows, shape)
            return dense.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if feats.ndim == 4 and _fmt_of(m) == "NHWC":
            b, h, w, c = feats.shape
            rows, shape = feats.reshape(-1, c), (lambda r: r[:, None, None, :])
        elif feats.ndim == 4:
            b, c, h, w = feats.shape
            rows, shape = feats.permute(0, 2, 3, 1).reshape(-1, c), (lambda r: r[:, :, None, None])
        elif feats.ndim == 3:  # tokens [B, N, C]: prefix tokens first, then the patch grid row-major
            npt = int(getattr(m, "num_prefix_tokens", 1 if getattr(m, "cls_token", None) is not None else 0))
            b, n, c = feats.shape
            h, w = self._token_grid(n - npt, x)
            rows = feats[:, npt:].reshape(-1, c)
            # Each position becomes a sequence of (prefix slots + 1) copies of itself, so every
            # pooling mode (class token, average, max, attention pool) returns that position.
            shape = lambda r: r[:, None, :].expand(-1, npt + 1, -1)  # noqa: E731
        else:
            raise TypeError(f"{type(m).__name__}.forward_features returned shape {tuple(feats.shape)}; "
                            "expected [B, C, h, w], [B, h, w, C] or tokens [B, N, C]")
        dense = self._per_position(m.forward_head, rows, shape)
        return dense.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = self.backbone(x)
        return self.dense_head(feats, x), logits
