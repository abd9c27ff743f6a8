"""The statistics: every figure follows its documented definition from counters and step times."""

from __future__ import annotations

import statistics

import pytest
import torch

from flashfn.adapters.stats import FlashStats, StepTimer, _display_width, format_box
from flashfn.core.flash import flash_init
from flashfn.core.weighting import weighting_update

LAYERS = ((torch.zeros(3, 4), torch.zeros(4)), (torch.zeros(3, 4), torch.zeros(4)))  # 16 parameters each
OTHERS = (torch.zeros(10),)
TOTAL = 42


def _state(steps=10, skipped_param_steps=48.0, virtual=3, weights=None):
    s = flash_init(LAYERS, OTHERS)
    c = s.counters
    s = s._replace(counters=c._replace(
        steps=torch.tensor(steps), skipped_param_steps=torch.tensor(skipped_param_steps, dtype=torch.float64),
        virtual_steps=torch.tensor(virtual), layer_steps=torch.tensor(2 * steps),
        skipped_layer_steps=torch.tensor(3)))
    if weights is not None:
        s = s._replace(weighting=weighting_update(s.weighting, weights))
    return s


def _timer(full, skipping):
    t = StepTimer()
    t.add(99.0, skipped_any=False)  # the first step pays one-time costs: not recorded
    for x in full:
        t.add(x, skipped_any=False)
    for x in skipping:
        t.add(x, skipped_any=True)
    return t


def test_timer_drops_the_first_step_and_splits_the_rest() -> None:
    t = _timer([0.2, 0.4], [0.1])
    assert t.ignored == 1 and t.full == [0.2, 0.4] and t.skipping == [0.1]
    assert t.total == pytest.approx(0.7)
    u = StepTimer()
    u.load_state_dict(t.state_dict())
    assert (u.full, u.skipping, u.ignored) == (t.full, t.skipping, t.ignored)


def test_figures_follow_their_definitions() -> None:
    full, skipping = [0.30, 0.20, 0.25], [0.1, 0.15, 0.12, 0.11, 0.2, 0.1]
    timer = _timer(full, skipping)
    s = _state(steps=10, skipped_param_steps=48.0, virtual=3, weights=torch.tensor([0.3, 1.0, 0.5, 1.0]))
    st = FlashStats.compute(s, timer, TOTAL)
    t_full = statistics.median(full)
    timed = len(full) + len(skipping)
    assert st["median_full_step_s"] == pytest.approx(t_full)
    assert st["effective_speedup"] == pytest.approx(t_full * timed * (10 + 3) / 10 / sum(full + skipping))
    assert st["alas_measured_step_saving"] == pytest.approx(1 - statistics.fmean(skipping) / t_full)
    assert st["alas_savings"] == pytest.approx(48.0 / (TOTAL * 10))
    assert st["alas_skipped_layer_share"] == pytest.approx(3 / 20)
    assert st["gca_virtual_share"] == pytest.approx(3 / 10) and st["gca_virtual_steps"] == 3
    assert st["sample_weight_avg"] == pytest.approx(2.8 / 4) and st["samples_down_weighted"] == 2
    # ALAS history: three flat copies of the 32 layer parameters; GCA: two directions over all 42
    # (plus a few hundred bytes of per-layer and scalar bookkeeping)
    history = 4 * (3 * 32 + 2 * 42)
    assert history <= st["memory_bytes"] < history + 256
    assert st["memory_vs_params"] == pytest.approx(st["memory_bytes"] / (4 * TOTAL))


def test_figures_change_with_the_run() -> None:
    a = FlashStats.compute(_state(virtual=0), _timer([0.2, 0.2], [0.1]), TOTAL)
    b = FlashStats.compute(_state(virtual=5), _timer([0.2, 0.2], [0.15]), TOTAL)
    assert a["effective_speedup"] != b["effective_speedup"]
    assert a["gca_virtual_share"] != b["gca_virtual_share"]


def test_missing_measurements_are_not_applicable() -> None:
    st = FlashStats.compute(_state(), StepTimer(), TOTAL)
    assert st["effective_speedup"] is None and st["sample_weight_avg"] is None
    box = st.box()
    assert "Effective Speedup: n/a" in box and "Sample Weight Avg: n/a" in box


def test_box_shows_the_figures_and_lines_up() -> None:
    st = FlashStats.compute(_state(weights=torch.tensor([0.5, 1.0])), _timer([0.2, 0.3], [0.1]), TOTAL)
    box = format_box(st)
    assert f"Effective Speedup: {st['effective_speedup']:.2f}x" in box
    assert f"ALAS Savings: {100 * st['alas_savings']:.1f}%" in box
    assert f"GCA Virtual Steps: {100 * st['gca_virtual_share']:.1f}%" in box
    assert "Sample Weight Avg: 0.750" in box and "Total Steps: 10" in box
    assert "Loss Spikes: 0 | Auto-Disables: 0" in box
    assert len({_display_width(line) for line in box.splitlines()}) == 1
