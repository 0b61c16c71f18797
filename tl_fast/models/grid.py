"""The token grid of an image size: the one rule every token-labeled model and the loader share."""
from __future__ import annotations


def token_grid_for(img_size: int | tuple[int, int], stride: int, model_name: str = "the model") -> tuple[int, int]:
    """``(H // stride, W // stride)``, or a one-line ``ValueError`` when ``stride`` does not divide the image."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    if h % stride or w % stride or h < stride or w < stride:
        raise ValueError(f"image size {h}x{w} gives no whole token grid for {model_name} (total stride {stride}); "
                         f"use a multiple of {stride}")
    return h // stride, w // stride
