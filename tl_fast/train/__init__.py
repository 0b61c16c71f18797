"""Reusable training pieces: optimizer groups, schedule, EMA, checkpoints, evaluation, logging, DDP."""
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, step_seed
from .distributed import (
    DistInfo, all_gather_object, all_reduce_sum, barrier, broadcast_buffers, cleanup_distributed, setup_distributed,
)
from .ema import ModelEma
from ..ops.class_loss import mix_lam, mixed_label_loss  # re-exported: the trainer imports them from here
from .metrics import JsonlLogger, ThroughputMeter, evaluate, format_seconds
from .optim import cosine_factor, cosine_schedule, param_groups, scaled_lr

__all__ = [
    "param_groups", "cosine_factor", "cosine_schedule", "scaled_lr", "ModelEma", "save_checkpoint",
    "load_checkpoint", "rng_state", "set_rng_state", "step_seed", "evaluate", "JsonlLogger",
    "ThroughputMeter", "format_seconds", "DistInfo", "setup_distributed", "cleanup_distributed",
    "all_reduce_sum", "all_gather_object", "barrier", "broadcast_buffers", "mix_lam", "mixed_label_loss",
]
