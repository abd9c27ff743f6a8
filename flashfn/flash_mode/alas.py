"""`transformers.flash_mode.alas`: the specification's path to ``ALASTracker``."""

from ..adapters import ALASTracker

__all__ = ["ALASTracker"]
