"""The stateful shell: the specification's classes and the ``transformers`` Trainer callback."""

from ..config import FlashConfig
from .alas import ALASTracker
from .callback import FlashModeCallback
from .gca import ConservativeGCA
from .sample_weighter import SampleWeighter
from .stats import FlashStats, format_box

__all__ = ["ALASTracker", "ConservativeGCA", "FlashConfig", "FlashModeCallback", "FlashStats", "SampleWeighter",
           "format_box"]
