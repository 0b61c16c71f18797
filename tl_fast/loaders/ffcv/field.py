"""The image field of a tl_fast ``.beton`` and the decoder that cuts each image by the plan.

* :class:`PlanRGBImageField` is FFCV's RGB image field with more metadata columns: the original
  image size (the plan is a function of it, while the stored image may be downscaled) and an unused
  ``epoch`` column kept for the file format.
* The plan reaches the compiled decoder through the image metadata, the one per-sample array FFCV
  passes to it at run time (numba bakes a captured array into the code as a constant copy, so an
  array captured by the decoder and refilled later would never be seen). :func:`add_plan_columns`
  gives a loader's in-memory metadata (the file is not touched) the crop ``(top, left, height,
  width)`` in original pixels, the flip and the output address of every sample; :func:`write_plan`
  fills them for a batch from its :class:`tl_fast.plan.BatchPlan` before the batch is decoded.
* :class:`PlanCropDecoder` is FFCV's resized-crop decoder reading those columns: it maps the crop
  proportionally into the stored image, decodes, crops, resizes and flips. It draws nothing. With
  an output address it writes the sample there as CHW, normalized or not (:mod:`.output`);
  without one (address 0) into FFCV's buffer as HWC, for FFCV operations after it.
"""
from __future__ import annotations

import numpy as np
from ffcv.fields import RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.compiler import Compiler

from .output import write_chw

# The per-sample plan the decoder reads, added to the image metadata in memory.
PLAN_COLUMNS = (("plan_top", "<i8"), ("plan_left", "<i8"), ("plan_height", "<i8"), ("plan_width", "<i8"),
                ("plan_flip", "u1"), ("plan_out", "<u8"))


class PlanRGBImageField(RGBImageField):
    """RGB image field that also records the original image size (before any pack-time downscale).

    ``encode`` takes ``(jpeg_bytes uint8 [n], stored_height, stored_width, orig_height, orig_width)``."""

    def __init__(self) -> None:
        super().__init__(write_mode="jpg")

    @property
    def metadata_type(self) -> np.dtype:
        return np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8"),
                         ("orig_height", "<u4"), ("orig_width", "<u4"), ("epoch", "<u8")])

    @staticmethod
    def from_binary(binary) -> "PlanRGBImageField":
        return PlanRGBImageField()

    def encode(self, destination, value, malloc) -> None:
        data, height, width, orig_height, orig_width = value
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        destination["mode"] = IMAGE_MODES["jpg"]
        destination["height"], destination["width"] = height, width
        destination["orig_height"], destination["orig_width"] = orig_height, orig_width
        destination["epoch"] = 0  # unused since the plan travels in memory (add_plan_columns)
        destination["data_ptr"], storage = malloc(data.nbytes)
        storage[:] = data


def add_plan_columns(loader: Loader) -> np.ndarray:
    """Replace the in-memory metadata of the FFCV ``loader`` (before its first epoch) by a copy whose
    image field also has :data:`PLAN_COLUMNS`, set to the whole image, unflipped; returns that
    image field's metadata, for :func:`write_plan`."""
    md = loader.reader.metadata
    names = list(loader.reader.handlers)
    key = next(f"f{i}" for i, n in enumerate(names) if isinstance(loader.reader.handlers[n], PlanRGBImageField))
    image_type = md.dtype[key]
    extended = np.dtype([(n, image_type.fields[n][0]) for n in image_type.names] + list(PLAN_COLUMNS))
    combined = np.dtype([(n, extended if n == key else md.dtype[n]) for n in md.dtype.names], align=True)
    out = np.zeros(len(md), dtype=combined)
    for n in md.dtype.names:
        if n == key:
            for sub in image_type.names:
                out[n][sub] = md[n][sub]
        else:
            out[n] = md[n]
    image = out[key]
    image["plan_height"] = image["orig_height"]
    image["plan_width"] = image["orig_width"]
    loader.reader.metadata = out
    return image


def write_plan(image_metadata: np.ndarray, indices: np.ndarray, crop: np.ndarray, flip: np.ndarray,
               addresses: np.ndarray | None = None) -> None:
    """Write samples ``indices``' crops ``[B, 4]`` (top, left, height, width; original pixels),
    flips ``[B]`` and output addresses ``[B]`` (:func:`.output.batch_output`; None: FFCV's buffer)
    into the plan columns of ``image_metadata`` (from :func:`add_plan_columns`)."""
    indices = np.asarray(indices, dtype=np.int64)
    for j, name in enumerate(("plan_top", "plan_left", "plan_height", "plan_width")):
        image_metadata[name][indices] = crop[:, j]
    image_metadata["plan_flip"][indices] = flip
    image_metadata["plan_out"][indices] = 0 if addresses is None else addresses


class PlanCropDecoder(ResizedCropRGBImageDecoder):
    """FFCV's resized-crop decoder with the crop, flip and output address read from the plan columns
    of the image metadata (:func:`add_plan_columns`); samples written to an address are normalized
    with ``normalize_table`` (float32 ``[3, 256]``, :func:`.output.normalize_table`) when given."""

    def __init__(self, output_size: int, normalize_table: np.ndarray | None = None) -> None:
        super().__init__((output_size, output_size))
        self.normalize_table = normalize_table

    @property
    def get_crop_generator(self):  # required by the abstract base; the plan replaces it
        raise NotImplementedError("PlanCropDecoder takes its crops from the plan")

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        normalize = self.normalize_table is not None
        table = self.normalize_table if normalize else np.zeros((3, 256), np.float32)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                oh = np.int64(field["orig_height"])
                ow = np.int64(field["orig_width"])
                top = np.int64(field["plan_top"])
                left = np.int64(field["plan_left"])
                ch = np.int64(field["plan_height"])
                cw = np.int64(field["plan_width"])
                flip = field["plan_flip"] != 0
                if oh != height or ow != width:  # stored downscaled: map the box proportionally
                    sy = np.float64(height) / np.float64(oh)
                    sx = np.float64(width) / np.float64(ow)
                    top2 = min(np.int64(np.rint(top * sy)), np.int64(height) - 1)
                    left2 = min(np.int64(np.rint(left * sx)), np.int64(width) - 1)
                    bottom = max(min(np.int64(np.rint((top + ch) * sy)), np.int64(height)), top2 + 1)
                    right = max(min(np.int64(np.rint((left + cw) * sx)), np.int64(width)), left2 + 1)
                    top, left, ch, cw = top2, left2, bottom - top2, right - left2
                out = destination[dst_ix]
                resize_crop_c(temp_buffer, top, top + ch, left, left + cw, out)
                address = np.uint64(field["plan_out"])
                if address != 0:
                    write_chw(out, flip, table, normalize, address)
                elif flip:
                    n = out.shape[1]
                    for r in range(out.shape[0]):
                        for c in range(n // 2):
                            for k in range(3):
                                tmp = out[r, c, k]
                                out[r, c, k] = out[r, n - 1 - c, k]
                                out[r, n - 1 - c, k] = tmp
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode
