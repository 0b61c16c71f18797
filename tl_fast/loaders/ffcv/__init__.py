"""The FFCV backend's rooms: a ``.beton`` written by ``tl-fast pack-ffcv``, read with a decoder whose
crop comes from the plan.

* :mod:`.memory`: tl_fast's own OS-cache manager (a subclass of FFCV's, used by tl_fast's loaders
  only), which leaves numba's shared types alone and checks the packed bytes it reads;
* :mod:`.field`: the image field (original sizes) and the decoder that reads each sample's crop,
  flip and output address from plan columns of the in-memory metadata;
* :mod:`.output`: the batch tensors the decoder writes into (CHW, normalized on the CPU);
* :mod:`.guard`: FFCV's loader and epoch iterator with errors forwarded and a watchdog;
* :mod:`.packed`: the packed file's description (:func:`read_packed`, :func:`packed_image_spans`);
* :mod:`.backend`: :class:`FFCVBackend`, what ``TokenLabelLoader(backend="ffcv")`` drives.
"""
from ...optional import require, require_tested

require("ffcv", "backend='ffcv'")
require_tested("ffcv", "tl_fast's FFCV backend")

from .backend import FFCVBackend  # noqa: E402
from .field import PLAN_COLUMNS, PlanCropDecoder, PlanRGBImageField, add_plan_columns, write_plan  # noqa: E402
from .guard import _GuardedEpochIterator, _GuardedLoader  # noqa: E402,F401
from .packed import (FIELDS, FORMAT, FORMAT_VERSION, META_SUFFIX, READABLE_FORMAT_VERSIONS, PackedInfo,  # noqa: E402
                     packed_image_spans, read_packed)

__all__ = ["FFCVBackend", "PLAN_COLUMNS", "PlanCropDecoder", "PlanRGBImageField", "add_plan_columns", "write_plan",
           "FIELDS", "FORMAT", "FORMAT_VERSION", "META_SUFFIX", "READABLE_FORMAT_VERSIONS", "PackedInfo",
           "packed_image_spans", "read_packed"]
