"""`transformers.flash_mode.config`: the specification's path to ``FlashConfig``."""

from ..config import FlashConfig

__all__ = ["FlashConfig"]
