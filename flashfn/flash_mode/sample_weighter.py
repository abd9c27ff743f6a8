"""`transformers.flash_mode.sample_weighter`: the specification's path to ``SampleWeighter``."""

from ..adapters import SampleWeighter

__all__ = ["SampleWeighter"]
