"""Models trained with token labeling. Importing this package registers LV-ViT with timm
(``timm.create_model("lvvit_s")``); :func:`token_labeling` gives any timm classifier LV-ViT's training
interface."""
from .lvvit import (
    MODEL_NAMES, LVViT, checkpoint_filter_fn, create_lvvit, load_checkpoint, lvvit_demo, lvvit_l, lvvit_l_448,
    lvvit_l_512, lvvit_m, lvvit_m_384, lvvit_m_448, lvvit_s, lvvit_s_384, lvvit_t, resize_pos_embed,
)
from .token_wrapper import TokenLabeling, is_token_labeling_model, token_labeling

__all__ = [
    "token_labeling", "TokenLabeling", "is_token_labeling_model",
    "LVViT", "MODEL_NAMES", "create_lvvit", "load_checkpoint", "checkpoint_filter_fn", "resize_pos_embed",
    "lvvit_t", "lvvit_s", "lvvit_s_384", "lvvit_m", "lvvit_m_384", "lvvit_m_448", "lvvit_l", "lvvit_l_448",
    "lvvit_l_512", "lvvit_demo",
]
