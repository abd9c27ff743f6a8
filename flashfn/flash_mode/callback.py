"""`transformers.flash_mode.callback`: the specification's path to ``FlashModeCallback``."""

from ..adapters import FlashModeCallback

__all__ = ["FlashModeCallback"]
