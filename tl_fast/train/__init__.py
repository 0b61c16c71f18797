"""The trainer (``tl-fast train``; :func:`tl_fast.train.main.main`) and its reusable pieces: checkpoints,
evaluation, logging, DDP. Optimizer, schedule, EMA and grad scaler are timm's (see :mod:`.factories`)."""
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state, step_seed
from .distributed import (
    DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_buffers, cleanup_distributed, setup_distributed,
)
from ..ops.class_loss import mix_lam, mixed_label_loss  # re-exported: the trainer imports them from here
from .metrics import JsonlLogger, ThroughputMeter, evaluate, format_seconds

__all__ = [
    "save_checkpoint", "read_checkpoint", "rng_state", "set_rng_state", "step_seed", "evaluate", "JsonlLogger",
    "ThroughputMeter", "format_seconds", "DistInfo", "setup_distributed", "cleanup_distributed",
    "all_reduce_sum", "all_gather_object", "barrier", "broadcast_buffers", "mix_lam", "mixed_label_loss",
]
