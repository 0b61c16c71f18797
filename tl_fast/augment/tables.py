"""The CPU path of :func:`tl_fast.augment.augment_batch`: photometric operations as look-up tables.

On a CPU the float path costs several full passes over ``[B, 3, S, S]`` float32 per batch (the
conversion, each operation on its samples, three for normalization), and float buffers over 32 MB
page-fault afresh on every batch (the output here asks for huge pages through
:func:`tl_fast.memory.new_output`). Most of timm's photometric operations are point
operations on each channel's uint8 levels, so here they compose into one 256-entry table per
(sample, channel), normalization included, and the image is read once as uint8 and written once as
float32 with OpenCV's ``LUT``:

- fixed tables (invert, posterize, solarize, solarize-add, brightness) are the reference operations
  of :mod:`tl_fast.augment.photometric` applied to a ramp of the 256 levels, so they agree by construction;
- auto-contrast and equalize take their table from the channel histogram of the current image,
  which is the source image's histogram pushed through the table composed so far;
- contrast takes its degenerate level from the current image's grayscale mean;
- colour and sharpness mix channels or neighbours: those samples are materialized (tables applied),
  run through the reference float operation, and continue from the result.

The output equals the float path exactly (tests/test_augment_cpu.py).
"""
from __future__ import annotations

import numpy as np
import torch

from ..memory import new_output
from ..plan import RA_OP_ID
from . import photometric as ref
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from .warp import opencv

TABLE_OPS = {  # point operations whose table depends only on the level
    "Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "BrightnessIncreasing"}
MATERIALIZE_OPS = {"ColorIncreasing", "SharpnessIncreasing"}  # need neighbouring pixels or channels
_RAMP = torch.arange(256, dtype=torch.float32).view(1, 1, 1, 256)


def _ramp(n: int) -> torch.Tensor:
    """The 256 levels as ``n`` float images ``[n, 3, 1, 256]``: a reference operation applied to it
    gives that operation's table."""
    return _RAMP.expand(n, 3, 1, 256).clone()


def _autocontrast_from_hist(hist: torch.Tensor) -> torch.Tensor:
    """:func:`tl_fast.augment.autocontrast_lut` for channels with histograms ``hist [m, 256]``."""
    levels = torch.arange(256).view(1, 256)
    used = hist > 0
    lo = torch.where(used, levels, 256).amin(-1)
    hi = torch.where(used, levels, -1).amax(-1)
    return ref.autocontrast_lut(lo, hi).long()


HISTOGRAM_OPS = {"AutoContrast": _autocontrast_from_hist, "Equalize": ref.equalize_lut}


class _Samples:
    """Per-sample state: the source uint8 image and the table composed since it was last materialized."""

    def __init__(self, images: torch.Tensor, replaced: dict[int, torch.Tensor], cv2) -> None:
        self.cv2 = cv2
        self.images = images.numpy()  # [B, 3, S, S] uint8, the batch as delivered
        # samples whose source image is another one ([3, S, S]): warped, or materialized below
        self.replaced = {int(b): img.contiguous().numpy() for b, img in replaced.items()}
        b = len(images)
        self.table = torch.arange(256).repeat(b, 3, 1)  # int64 [B, 3, 256]
        self.hist: dict[int, torch.Tensor] = {}

    def image(self, b: int) -> np.ndarray:
        return self.replaced.get(b, self.images[b])

    def compose(self, sel: np.ndarray, table: torch.Tensor) -> None:
        """Apply ``table [n, 3, 256]`` after the samples' current tables."""
        idx = torch.from_numpy(sel)
        self.table[idx] = table.gather(-1, self.table[idx])

    def histograms(self, sel: np.ndarray) -> torch.Tensor:
        """Channel histograms ``[n * 3, 256]`` of the samples' current images."""
        out = []
        for b in sel.tolist():
            if b not in self.hist:
                img = self.image(b)
                self.hist[b] = torch.from_numpy(np.stack(
                    [self.cv2.calcHist([img[c]], [0], None, [256], [0, 256]).reshape(-1) for c in range(3)]).astype(np.int64))
            out.append(torch.zeros(3, 256, dtype=torch.int64).scatter_add_(-1, self.table[b], self.hist[b]))
        return torch.cat(out)

    def materialize(self, sel: np.ndarray) -> torch.Tensor:
        """The samples' current images as float levels ``[n, 3, S, S]``."""
        planes = [[self.cv2.LUT(self.image(b)[c], self.table[b, c].to(torch.uint8).numpy()) for c in range(3)]
                  for b in sel.tolist()]
        return torch.from_numpy(np.asarray(planes)).float()

    def replace(self, sel: np.ndarray, levels: torch.Tensor) -> None:
        """Make ``levels`` (float whole levels) the samples' new source images, with identity tables."""
        u8 = levels.to(torch.uint8).numpy()
        for i, b in enumerate(sel.tolist()):
            self.replaced[b] = u8[i]
            self.hist.pop(b, None)
        self.table[torch.from_numpy(sel)] = torch.arange(256)


def augment_photometric_normalize(images: torch.Tensor, ra_op: np.ndarray, ra_level: np.ndarray,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  replaced: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
    """:func:`tl_fast.augment.apply_photometric` then :func:`~tl_fast.augment.normalize` for uint8 CPU
    images ``[B, 3, S, S]``, as float32; None without OpenCV. ``replaced`` maps sample positions to
    images ``[3, S, S]`` that stand in for theirs (the warped ones), saving a copy of the batch."""
    cv2 = opencv()
    if cv2 is None:
        return None
    images = images.contiguous()
    n = len(images)
    ra_op = np.asarray(ra_op).reshape(n, -1)
    ra_level = np.asarray(ra_level, dtype=np.float64).reshape(n, -1)
    state = _Samples(images, replaced or {}, cv2)
    for j in range(ra_op.shape[1]):
        for name in ref.PHOTOMETRIC_OPS:
            sel = np.flatnonzero(ra_op[:, j] == RA_OP_ID[name])
            if not len(sel):
                continue
            level = torch.from_numpy(ra_level[sel, j].astype(np.float32))
            if name in TABLE_OPS:
                state.compose(sel, ref.PHOTOMETRIC[name](_ramp(len(sel)), level).long().view(len(sel), 3, 256))
            elif name in HISTOGRAM_OPS:
                state.compose(sel, HISTOGRAM_OPS[name](state.histograms(sel)).view(len(sel), 3, 256))
            elif name == "ContrastIncreasing":
                degenerate = ref.contrast_mean(state.materialize(sel)).expand(len(sel), 3, 1, 256)
                table = ref.blend(degenerate, _ramp(len(sel)), level)
                state.compose(sel, table.long().view(len(sel), 3, 256))
            else:
                assert name in MATERIALIZE_OPS, name
                state.replace(sel, ref.PHOTOMETRIC[name](state.materialize(sel), level))
    # Normalization as a float table on the levels, then one table look-up per plane.
    norm = normalize(_ramp(1), mean, std).view(1, 3, 256)
    tables = norm.expand(n, 3, 256).gather(-1, state.table).contiguous().numpy()
    out = new_output(tuple(images.shape), torch.float32, torch.device("cpu"))
    dst = out.numpy()
    for b in range(n):
        img = state.image(b)
        for c in range(3):
            cv2.LUT(img[c], tables[b, c], dst=dst[b, c])
    return out
