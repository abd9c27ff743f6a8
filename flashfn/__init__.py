"""flashfn: Flash Mode for PyTorch training, as pure functions with a thin stateful shell.

Three rooms:

- :mod:`flashfn.core`: pure functions over immutable state (ALAS, sample
  weighting, GCA, safety) and the state machine that composes them;
- :mod:`flashfn.func`: the ``torch.func`` layer (layer map, real backward
  skipping, per-sample losses and gradients, GCA optimizer steps);
- :mod:`flashfn.adapters`: the stateful classes of the specification and the
  ``transformers`` Trainer callback.

The specification's import path ``transformers.flash_mode`` is an alias of
:mod:`flashfn.flash_mode` (see ``docs/usage.md``).

Public names are imported lazily, so ``import flashfn`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FlashConfig": "flashfn.config",
    "FlashModeCallback": "flashfn.adapters.callback",
    "ALASTracker": "flashfn.adapters.alas",
    "SampleWeighter": "flashfn.adapters.sample_weighter",
    "ConservativeGCA": "flashfn.adapters.gca",
    "FlashStats": "flashfn.adapters.stats",
    # functional core
    "ALASState": "flashfn.core",
    "alas_init": "flashfn.core",
    "alas_update": "flashfn.core",
    "should_backward": "flashfn.core",
    "interpolate": "flashfn.core",
    "weigh_samples": "flashfn.core",
    "weighted_loss": "flashfn.core",
    "GCAState": "flashfn.core",
    "gca_init": "flashfn.core",
    "gca_update": "flashfn.core",
    "SafetyState": "flashfn.core",
    "safety_init": "flashfn.core",
    "safety_update": "flashfn.core",
    "is_honest_step": "flashfn.core",
    "FlashState": "flashfn.core.flash",
    "flash_init": "flashfn.core.flash",
    "plan_step": "flashfn.core.flash",
    "flash_update": "flashfn.core.flash",
    # torch.func layer
    "find_layers": "flashfn.func",
    "BlockSkipper": "flashfn.func",
    "masked_value_and_grad": "flashfn.func",
    "finish_step": "flashfn.func",
    "flash_init_for": "flashfn.func",
    "apply_gradients": "flashfn.func",
    "gca_after_step": "flashfn.func",
    "per_sample_grads": "flashfn.func",
    "per_sample_losses": "flashfn.func",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flashfn' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
