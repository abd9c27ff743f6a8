"""`transformers.flash_mode.gca`: the specification's path to ``ConservativeGCA``."""

from ..adapters import ConservativeGCA

__all__ = ["ConservativeGCA"]
