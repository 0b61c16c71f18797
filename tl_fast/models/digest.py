"""A model's identity: one digest of its weights (annotate's resume check, the trainer's rank check)."""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn


def weights_digest(model: nn.Module) -> str:
    """sha1 of a model's state dict (names and bytes): equal digests, equal weights."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
