"""The specification's import path: ``transformers.flash_mode`` is an alias of this package.

``from transformers.flash_mode import FlashConfig, FlashModeCallback`` works
after ``pip install flashfn`` (see ``flashfn_alias.py``).
"""

from ..adapters import ALASTracker, ConservativeGCA, FlashConfig, FlashModeCallback, FlashStats, SampleWeighter

__all__ = ["ALASTracker", "ConservativeGCA", "FlashConfig", "FlashModeCallback", "FlashStats", "SampleWeighter"]
