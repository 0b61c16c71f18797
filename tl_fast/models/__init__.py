"""Models trained with token labeling."""
from .lvvit import (
    MODEL_NAMES, LVViT, checkpoint_filter_fn, create_lvvit, load_checkpoint, lvvit_demo, lvvit_l, lvvit_m,
    lvvit_s, lvvit_t, resize_pos_embed,
)

__all__ = [
    "LVViT", "MODEL_NAMES", "create_lvvit", "load_checkpoint", "checkpoint_filter_fn", "resize_pos_embed",
    "lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l", "lvvit_demo",
]
