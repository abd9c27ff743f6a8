"""``FlashConfig``: every knob of Flash Mode, validated when it is built.

This module imports nothing heavy (no torch), so that the configuration can be
built, validated and serialised anywhere.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple

__all__ = ["FlashConfig"]

MECHANISMS = ("branch", "freeze")
PREDICTORS = ("ema", "momentum", "none")
HISTORY_DTYPES = ("float32", "bfloat16")


def _check(name: str, value: Any, kind: type, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` when ``value`` is not a ``kind`` inside the range."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok:
        raise TypeError(f"FlashConfig.{name} must be a {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is bool:
        return
    if value != value or value in (float("inf"), float("-inf")):  # NaN / inf
        raise ValueError(f"FlashConfig.{name} must be finite, got {value!r}")
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"FlashConfig.{name} must be in {rng}, got {value!r}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"FlashConfig.{name} must be in {rng}, got {value!r}")


@dataclass(frozen=True)
class FlashConfig:
    """Configuration of Flash Mode (the specification's fields, defaults and a few documented extras).

    The first block of fields is exactly the specification's. The extras after
    ``log_every`` are the library's own; each is documented in
    ``docs/configuration.md``. Every field is validated at construction: a wrong
    type raises ``TypeError`` and a value out of range raises ``ValueError``,
    both naming the field and its allowed range.

    Example:
        >>> cfg = FlashConfig(warmup_steps=10)
        >>> cfg.min_activity
        0.3
    """

    # Components
    enable_alas: bool = True
    enable_sample_weighting: bool = True
    enable_gca: bool = True

    # ALAS parameters
    min_activity: float = 0.3
    honest_check_every: int = 20
    activity_decay: float = 0.95

    # Sample weighting
    min_sample_weight: float = 0.3
    low_loss_threshold: float = 0.5

    # GCA parameters
    coherence_threshold: float = 0.95
    max_virtual_steps: int = 2
    gca_checkpoint_every: int = 5

    # Safety
    warmup_steps: int = 100
    loss_spike_threshold: float = 1.1
    auto_disable_on_spike: bool = True

    # Logging
    verbose: bool = True
    log_every: int = 50

    # ---- extras (the library's own; see docs/configuration.md) ----
    seed: int = 0
    alas_mechanism: str = "branch"
    predictor: str = "momentum"
    min_fidelity: float = 0.5
    step_back_after: int = 10
    prune_ratio: float = 0.0
    interp_decay: float = 0.9
    trend_weight: float = 0.2
    noise_scale: float = 0.05
    max_consecutive_skips: int = 5
    gca_smoothing: float = 0.8
    spike_cooldown_steps: int = 100
    layers: Optional[Tuple[str, ...]] = None
    history_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("enable_alas", "enable_sample_weighting", "enable_gca", "auto_disable_on_spike", "verbose"):
            _check(name, getattr(self, name), bool)
        _check("min_activity", self.min_activity, float, 0.0, 1.0, lo_open=True)
        _check("honest_check_every", self.honest_check_every, int, 1)
        _check("activity_decay", self.activity_decay, float, 0.0, 1.0, hi_open=True)
        _check("min_sample_weight", self.min_sample_weight, float, 0.0, 1.0, lo_open=True)
        _check("low_loss_threshold", self.low_loss_threshold, float, 0.0, None, lo_open=True)
        _check("coherence_threshold", self.coherence_threshold, float, -1.0, 1.0)
        _check("max_virtual_steps", self.max_virtual_steps, int, 0)
        _check("gca_checkpoint_every", self.gca_checkpoint_every, int, 1)
        _check("warmup_steps", self.warmup_steps, int, 0)
        _check("loss_spike_threshold", self.loss_spike_threshold, float, 1.0, None, lo_open=True)
        _check("log_every", self.log_every, int, 1)
        _check("seed", self.seed, int, 0, 2**63 - 1)
        _check("min_fidelity", self.min_fidelity, float, 0.0, 1.0, hi_open=True)
        _check("step_back_after", self.step_back_after, int, 0)
        _check("prune_ratio", self.prune_ratio, float, 0.0, 1.0, hi_open=True)
        _check("interp_decay", self.interp_decay, float, 0.0, 1.0, hi_open=True)
        _check("trend_weight", self.trend_weight, float, 0.0, 1.0)
        _check("noise_scale", self.noise_scale, float, 0.0, 1.0)
        _check("max_consecutive_skips", self.max_consecutive_skips, int, 1)
        _check("gca_smoothing", self.gca_smoothing, float, 0.0, 1.0, hi_open=True)
        _check("spike_cooldown_steps", self.spike_cooldown_steps, int, 0)
        for name, choices in (("alas_mechanism", MECHANISMS), ("predictor", PREDICTORS),
                              ("history_dtype", HISTORY_DTYPES)):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"FlashConfig.{name} must be a str, one of {choices}, got {getattr(self, name)!r}")
            if getattr(self, name) not in choices:
                raise ValueError(f"FlashConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.layers is not None:
            if isinstance(self.layers, str) or not isinstance(self.layers, (list, tuple)) \
                    or not all(isinstance(x, str) for x in self.layers):
                raise TypeError(f"FlashConfig.layers must be a sequence of module paths (str), got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
            if not self.layers:
                raise ValueError("FlashConfig.layers must name at least one module when given")

    @classmethod
    def for_arguments(cls, owner: str, names: dict, **values: Any) -> FlashConfig:
        """A config from another API's arguments, whose errors name that API's argument.

        Args:
            owner: the class the arguments belong to (for the messages).
            names: ``{argument name: FlashConfig field}``.
            **values: the arguments, by argument name.

        Example:
            >>> FlashConfig.for_arguments("SampleWeighter", {"min_weight": "min_sample_weight"},
            ...                           min_weight=0.5).min_sample_weight
            0.5
        """
        try:
            return cls(**{names.get(k, k): v for k, v in values.items()})
        except (TypeError, ValueError) as err:
            msg = str(err)
            for arg, field in names.items():
                msg = msg.replace(f"FlashConfig.{field} ", f"{owner}({arg}=...): {arg} ")
            raise type(err)(msg) from None

    def replace(self, **changes: Any) -> FlashConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The configuration as a plain dict (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        if d["layers"] is not None:
            d["layers"] = list(d["layers"])
        return d
