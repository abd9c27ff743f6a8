"""Safety: warm-up, the honest-check schedule and loss-spike detection with auto-disable.

Loss spikes are judged on smoothed losses, since single minibatch losses are
too noisy: ``fast`` is an exponential moving average of the loss with decay
0.9 (about the last 10 steps), ``baseline`` one with decay 0.99 (about the
last 100). After warm-up, a *spike* starts when ``fast > loss_spike_threshold
* baseline`` and ends when ``fast`` falls back under that bound; each spike is
counted once. With ``auto_disable_on_spike`` a spike disables Flash Mode
(plain training) for ``spike_cooldown_steps`` steps *and* until the spike has
ended; it re-enables by itself after that. Non-finite losses are counted and
never enter the averages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._util import ema

Tensor = torch.Tensor

__all__ = ["SafetyState", "SafetyEvents", "safety_init", "safety_update", "is_active", "is_honest_step"]

FAST_DECAY = 0.9
SLOW_DECAY = 0.99


class SafetyState(NamedTuple):
    """Immutable state of the safety logic."""

    step: Tensor  # int64, optimizer steps seen
    fast: Tensor  # float64 smoothed loss (NaN before the first)
    baseline: Tensor  # float64 slowly smoothed loss
    in_spike: Tensor  # bool
    disabled_until: Tensor  # int64, step before which Flash Mode is off (0: never disabled)
    spikes: Tensor  # int64
    disables: Tensor  # int64
    nonfinite: Tensor  # int64, non-finite losses seen


class SafetyEvents(NamedTuple):
    """What happened on this update."""

    spike: bool  # a spike started
    disabled: bool  # Flash Mode was disabled by it
    nonfinite: bool  # the loss was NaN or infinite


def safety_init() -> SafetyState:
    """A fresh state."""
    z = torch.zeros((), dtype=torch.int64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return SafetyState(z, nan, nan, torch.tensor(False), z, z, z, z)


def is_honest_step(step: int, *, warmup_steps: int, honest_check_every: int) -> bool:
    """Whether optimizer step ``step`` (0-based) is an honest one: warm-up, or every ``honest_check_every`` after it.

    Example:
        >>> [is_honest_step(s, warmup_steps=2, honest_check_every=3) for s in range(7)]
        [True, True, True, False, False, True, False]
    """
    return step < warmup_steps or (step - warmup_steps) % honest_check_every == 0


def is_active(state: SafetyState, *, warmup_steps: int, auto_disable_on_spike: bool = True) -> bool:
    """Whether Flash Mode may act on the next step (past warm-up, not disabled by a spike)."""
    if int(state.step) < warmup_steps:
        return False
    if auto_disable_on_spike and (int(state.step) < int(state.disabled_until) or bool(state.in_spike)):
        return False
    return True


def safety_update(
    state: SafetyState,
    loss: float | Tensor,
    *,
    warmup_steps: int = 100,
    loss_spike_threshold: float = 1.1,
    auto_disable_on_spike: bool = True,
    spike_cooldown_steps: int = 100,
) -> tuple[SafetyState, SafetyEvents]:
    """Fold one optimizer step's loss in and detect a spike.

    Args:
        state: the current state.
        loss: the step's training loss.
        warmup_steps: no spike is reported during warm-up (the averages still learn).
        loss_spike_threshold: factor over the baseline that makes a spike.
        auto_disable_on_spike: disable Flash Mode on a spike.
        spike_cooldown_steps: how long a spike disables it at least.

    Returns:
        ``(new_state, events)``.
    """
    loss_t = torch.as_tensor(loss, dtype=torch.float64).detach().reshape(()).clone()
    step = state.step + 1
    if not bool(torch.isfinite(loss_t)):
        return state._replace(step=step, nonfinite=state.nonfinite + 1), SafetyEvents(False, False, True)
    first = bool(torch.isnan(state.fast))
    fast = loss_t if first else ema(state.fast, loss_t, FAST_DECAY)
    baseline = loss_t if first else ema(state.baseline, loss_t, SLOW_DECAY)
    above = int(state.step) >= warmup_steps and bool(fast > loss_spike_threshold * baseline)
    spike = above and not bool(state.in_spike)
    disabled = spike and auto_disable_on_spike
    new = state._replace(
        step=step, fast=fast, baseline=baseline, in_spike=torch.tensor(above),
        spikes=state.spikes + int(spike), disables=state.disables + int(disabled),
        disabled_until=step + spike_cooldown_steps if disabled else state.disabled_until,
    )
    return new, SafetyEvents(spike, disabled, False)
