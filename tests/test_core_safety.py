"""Tests for ``flashfn.core.safety``: honest-check schedule, spikes, auto-disable, non-finite losses."""

from __future__ import annotations

import math
from typing import List

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashfn.core.safety import SafetyState, is_active, is_honest_step, safety_init, safety_update

FAST = settings(max_examples=30, deadline=None)
FAST_DECAY, SLOW_DECAY = 0.9, 0.99  # the module docstring's "about 10 steps" and "about 100 steps"


def reference_emas(losses: List[float]):
    """Plain float64 EMAs of the finite losses (fast: decay 0.9, baseline: decay 0.99), after each step."""
    fast = base = None
    out = []
    for x in losses:
        if math.isfinite(x):
            fast = x if fast is None else FAST_DECAY * fast + (1 - FAST_DECAY) * x
            base = x if base is None else SLOW_DECAY * base + (1 - SLOW_DECAY) * x
        out.append((fast, base))
    return out


def run(losses: List[float], **kw):
    s = safety_init()
    states, events = [], []
    for x in losses:
        s, e = safety_update(s, x, **kw)
        states.append(s)
        events.append(e)
    return states, events


# --------------------------------------------------------------------------- #
# is_honest_step
# --------------------------------------------------------------------------- #


@FAST
@given(st.integers(0, 50), st.integers(1, 30))
def test_honest_step_schedule(warmup: int, every: int) -> None:
    honest = set(range(warmup))
    nxt = warmup
    while nxt < 300:
        honest.add(nxt)
        nxt += every
    got = {s for s in range(300) if is_honest_step(s, warmup_steps=warmup, honest_check_every=every)}
    assert got == honest


def test_honest_step_spec_defaults() -> None:
    got = [s for s in range(100, 170) if is_honest_step(s, warmup_steps=100, honest_check_every=20)]
    assert got == [100, 120, 140, 160]
    assert all(is_honest_step(s, warmup_steps=100, honest_check_every=20) for s in range(100))


# --------------------------------------------------------------------------- #
# Spikes and auto-disable
# --------------------------------------------------------------------------- #

WARMUP = 20
JUMP_AT = 40  # well after warm-up


def jump_curve(n: int = 400, jump_at: int = JUMP_AT, factor: float = 1.3) -> List[float]:
    return [1.0 if t < jump_at else factor for t in range(n)]


def spike_window(losses: List[float], warmup: int, threshold: float = 1.1):
    """(update index where the spike starts, update index where it ends) from the reference EMAs."""
    flags = [t >= warmup and f > threshold * b for t, (f, b) in enumerate(reference_emas(losses))]
    starts = [t for t in range(len(flags)) if flags[t] and (t == 0 or not flags[t - 1])]
    ends = [t for t in range(1, len(flags)) if flags[t - 1] and not flags[t]]
    return starts, ends


@pytest.mark.parametrize("cooldown", [0, 10, 200])
def test_a_thirty_percent_jump_is_one_spike_and_disables_for_cooldown_and_spike(cooldown: int) -> None:
    losses = jump_curve()
    starts, ends = spike_window(losses, WARMUP)
    assert len(starts) == 1 and len(ends) == 1  # the reference sees one spike, which ends
    start, end = starts[0], ends[0]
    states, events = run(losses, warmup_steps=WARMUP, loss_spike_threshold=1.1, auto_disable_on_spike=True,
                         spike_cooldown_steps=cooldown)
    assert [t for t, e in enumerate(events) if e.spike] == [start]
    assert [t for t, e in enumerate(events) if e.disabled] == [start]
    assert start > JUMP_AT
    last = states[-1]
    assert int(last.spikes) == 1 and int(last.disables) == 1
    # the plan made after update t uses states[t]: inactive from the spike for `cooldown` plans and until it ends
    inactive_until = max(start + cooldown, end)
    for t, s in enumerate(states):
        active = is_active(s, warmup_steps=WARMUP, auto_disable_on_spike=True)
        expected = (t + 1 >= WARMUP) and not (start <= t < inactive_until)
        assert active == expected, (t, start, end, cooldown)
    assert is_active(last, warmup_steps=WARMUP)  # back on by itself


def test_without_auto_disable_the_spike_is_counted_but_flash_stays_active() -> None:
    losses = jump_curve()
    starts, _ = spike_window(losses, WARMUP)
    states, events = run(losses, warmup_steps=WARMUP, auto_disable_on_spike=False, spike_cooldown_steps=50)
    assert [t for t, e in enumerate(events) if e.spike] == starts
    assert not any(e.disabled for e in events)
    assert int(states[-1].spikes) == 1 and int(states[-1].disables) == 0
    assert all(is_active(s, warmup_steps=WARMUP, auto_disable_on_spike=False) for s in states[WARMUP:])


def test_no_spike_during_warmup() -> None:
    losses = jump_curve(n=300, jump_at=5, factor=3.0)  # a big jump at step 5, over by step 250
    states, events = run(losses, warmup_steps=250)
    assert not any(e.spike or e.disabled for e in events)
    assert int(states[-1].spikes) == 0
    assert not any(is_active(s, warmup_steps=250) for s in states[:249])
    assert is_active(states[-1], warmup_steps=250)


def test_small_rise_under_threshold_is_no_spike() -> None:
    losses = jump_curve(factor=1.05)
    _, events = run(losses, warmup_steps=WARMUP, loss_spike_threshold=1.1)
    assert not any(e.spike for e in events)


def test_averages_follow_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    losses = (2.0 + torch.rand(150, generator=g, dtype=torch.float64)).tolist()
    states, _ = run(losses, warmup_steps=10)
    for s, (f, b) in zip(states, reference_emas(losses)):
        assert float(s.fast) == pytest.approx(f, rel=1e-12)
        assert float(s.baseline) == pytest.approx(b, rel=1e-12)


@FAST
@given(st.lists(st.one_of(st.floats(0.5, 5.0), st.sampled_from([float("nan"), float("inf"), float("-inf")])),
                min_size=1, max_size=60), st.integers(0, 30))
def test_nonfinite_losses_are_counted_and_never_enter_the_averages(losses: List[float], warmup: int) -> None:
    states, events = run(losses, warmup_steps=warmup)
    ref = reference_emas(losses)
    n_bad = 0
    for x, s, e, (f, b) in zip(losses, states, events, ref):
        n_bad += not math.isfinite(x)
        assert e.nonfinite == (not math.isfinite(x))
        assert int(s.nonfinite) == n_bad
        if f is None:
            assert bool(torch.isnan(s.fast)) and bool(torch.isnan(s.baseline))
        else:
            assert float(s.fast) == pytest.approx(f, rel=1e-12)
            assert float(s.baseline) == pytest.approx(b, rel=1e-12)
        if not math.isfinite(x):
            assert not e.spike and not e.disabled
    assert int(states[-1].step) == len(losses)


def test_nan_in_the_middle_of_a_spike_neither_ends_nor_restarts_it() -> None:
    losses = jump_curve()
    start = spike_window(losses, WARMUP)[0][0]
    losses[start + 3] = float("nan")
    states, events = run(losses, warmup_steps=WARMUP, spike_cooldown_steps=0)
    assert sum(e.spike for e in events) == 1
    assert bool(states[start + 3].in_spike)


def test_is_active_respects_warmup() -> None:
    s = safety_init()
    for _ in range(5):
        assert not is_active(s, warmup_steps=5)
        s, _ = safety_update(s, 1.0, warmup_steps=5)
    assert is_active(s, warmup_steps=5)
    assert is_active(safety_init(), warmup_steps=0)


@pytest.mark.parametrize("kind", ["float", "f32_0d", "f64_0d", "f32_1elem"])
def test_loss_kinds_keep_the_state_stable_and_unaliased(kind: str) -> None:
    def make(v: float):
        return {"float": lambda: v, "f32_0d": lambda: torch.tensor(v), "f64_0d": lambda: torch.tensor(v).double(),
                "f32_1elem": lambda: torch.tensor([v])}[kind]()

    s: SafetyState = safety_init()
    meta = [(x.dtype, x.shape) for x in optree.tree_leaves(s)]
    for t in range(6):
        loss = make(1.0 + t)
        s, _ = safety_update(s, loss, warmup_steps=2)
        assert [(x.dtype, x.shape) for x in optree.tree_leaves(s)] == meta
        kept = optree.tree_map(torch.clone, s)
        if isinstance(loss, torch.Tensor):
            loss.add_(100.0)  # the caller reuses its loss buffer
        assert all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(s), optree.tree_leaves(kept))), (
            "the state aliases the loss tensor")
