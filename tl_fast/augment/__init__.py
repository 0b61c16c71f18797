"""Device-side batch augmentation shared by every loader backend.

Backends deliver the plan's crop, resized and flipped, as uint8 ``[B, 3, S, S]``. This module finishes
the batch on the device, vectorized over the batch (a loop over the ~10 operation kinds, never over
samples):

1. RandAugment geometry: the plan's ``ra_affine`` (output -> input, normalized ``[0, 1]``
   coordinates, :mod:`tl_fast.geometry`) warps the image with ``grid_sample`` (bilinear,
   ``align_corners=False``), outside filled with timm's fill colour (the ImageNet mean as uint8); on
   CPU with OpenCV's ``warpAffine`` on uint8 instead (within one level, much cheaper). The labels use
   the same matrix through ``plan.affine``.
2. RandAugment photometric operations of timm's ``rand-m9-mstd0.5-inc1`` set, per sample with the
   plan's ``ra_op``/``ra_level``, in layer order, with PIL's integer semantics (each operation
   returns whole uint8 levels, blends truncate like ``Image.blend``).
   On CPU, steps 2 and 3's normalization run as per-sample look-up tables on uint8
   (:mod:`tl_fast.augment.tables`), with the same results.
3. Normalization (ImageNet mean/std), then random erasing (timm's ``RandomErasing``: probability
   0.25, area 2%..1/3, aspect 0.3..3.3, one box, per-pixel normal noise) of the plan's boxes.

Nothing here draws: the plan (:class:`tl_fast.plan.BatchPlan`, drawn once per batch by the loader)
carries the RandAugment operations, the erasing boxes (counter RNG keyed by ``(seed, epoch, sample
index)``, stream ``rng.Stream.ERASE``) and the seed of the erasing noise (keyed by ``(seed, epoch,
first sample index of the batch)``, which seeds a device generator). ``EraseConfig``,
``erase_boxes`` and ``noise_seed`` are the plan's, re-exported here.

One deliberate difference from timm: the geometric warp is applied once, composed, before the
photometric operations (timm interleaves them as drawn). The geometry is identical; only the fill
pixels may then also be touched by a later photometric operation.

Modules, one job each: :mod:`.warp` (geometry), :mod:`.photometric` (the operations),
:mod:`.tables` (the CPU look-up-table path), :mod:`.normalize`, :mod:`.erase`, and :mod:`.batch`
(the device step that applies a plan with them).
"""
from .batch import augment_batch
from .erase import EraseConfig, erase_boxes, noise_seed, random_erase
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize
from .photometric import GEOMETRIC_IDS, PHOTOMETRIC, PHOTOMETRIC_OPS, apply_photometric
from .warp import FILL, grid_sample_theta, opencv, pixel_affines, warp, warp_uint8_cv2

__all__ = [
    "augment_batch", "EraseConfig", "erase_boxes", "noise_seed", "random_erase", "IMAGENET_MEAN", "IMAGENET_STD",
    "normalize", "GEOMETRIC_IDS", "PHOTOMETRIC", "PHOTOMETRIC_OPS", "apply_photometric", "FILL",
    "grid_sample_theta", "opencv", "pixel_affines", "warp", "warp_uint8_cv2",
]
