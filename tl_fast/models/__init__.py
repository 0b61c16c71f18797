"""Models trained with token labeling. Importing this package registers LV-ViT with timm
(``timm.create_model("lvvit_s")``)."""
from .lvvit import (
    MODEL_NAMES, LVViT, checkpoint_filter_fn, create_lvvit, load_checkpoint, lvvit_demo, lvvit_l, lvvit_l_448,
    lvvit_l_512, lvvit_m, lvvit_m_384, lvvit_m_448, lvvit_s, lvvit_s_384, lvvit_t, resize_pos_embed,
)

__all__ = [
    "LVViT", "MODEL_NAMES", "create_lvvit", "load_checkpoint", "checkpoint_filter_fn", "resize_pos_embed",
    "lvvit_t", "lvvit_s", "lvvit_s_384", "lvvit_m", "lvvit_m_384", "lvvit_m_448", "lvvit_l", "lvvit_l_448",
    "lvvit_l_512", "lvvit_demo",
]
