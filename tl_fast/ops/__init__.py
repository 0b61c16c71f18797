from .reference import token_label_loss, token_targets

__all__ = ["token_targets", "token_label_loss"]
