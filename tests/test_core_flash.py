"""Tests for ``flashfn.core.flash``: the plan/update state machine, over scripted sequences."""

from __future__ import annotations

import math
from typing import List

import optree
import pytest
import torch

from flashfn.config import FlashConfig
from flashfn.core.flash import StepPlan, flash_init, flash_update, plan_step
from flashfn.core.gca import GCADecision

SHAPES = (((2, 3),), ((4,),), ((1,), (1,)))  # layer sizes 6, 4, 2
SIZES = [6, 4, 2]
OTHER_SHAPES = ((5,),)
COMPUTE, SKIP = 0.0, 1.0  # u = 0 is below any activity (> 0), u = 1 below none (<= 1)


def params():
    g = torch.Generator().manual_seed(0)
    layer = tuple(tuple(torch.randn(s, generator=g) for s in shapes) for shapes in SHAPES)
    other = tuple(torch.randn(s, generator=g) for s in OTHER_SHAPES)
    return layer, other


def grads(t: int, noise: float = 0.05):
    """Gradients of step ``t``: a fixed direction plus a little noise (coherent, predictable)."""
    g = torch.Generator().manual_seed(100 + t)
    base = torch.Generator().manual_seed(1)
    layer = tuple(tuple(torch.randn(s, generator=base) + noise * torch.randn(s, generator=g) for s in shapes)
                  for shapes in SHAPES)
    other = tuple(torch.randn(s, generator=base) + noise * torch.randn(s, generator=g) for s in OTHER_SHAPES)
    return layer, other


def u_of(pattern: str) -> torch.Tensor:
    return torch.tensor([COMPUTE if c == "c" else SKIP for c in pattern], dtype=torch.float64)


def step(state, cfg, t: int, pattern: str, loss: float = 1.0, weights=None):
    lp, op = params()
    lg, og = grads(t)
    plan = plan_step(state, cfg, u=u_of(pattern))
    layer_grads = tuple(g if bool(c) else None for g, c in zip(lg, plan.compute))
    new, preds, dec = flash_update(state, cfg, plan, layer_grads, lp, loss, other_grads=og, weights=weights)
    return plan, new, preds, dec


# --------------------------------------------------------------------------- #
# Warm-up
# --------------------------------------------------------------------------- #


def test_flash_init() -> None:
    lp, op = params()
    s = flash_init(lp, op)
    assert s.layer_sizes.tolist() == SIZES
    assert int(s.step) == 0
    assert all(int(x) == 0 for x in s.counters)
    # GCA follows the whole gradient (outside parameters, then the layers) as one flat vector
    assert s.gca.direction.shape == (sum(p.numel() for p in optree.tree_leaves((op, lp))),)
    assert flash_init(lp, op, with_gca=False).gca.direction.numel() == 0


def test_warmup_plans_are_honest_inactive_and_not_weighing() -> None:
    cfg = FlashConfig(warmup_steps=5, honest_check_every=3)
    lp, op = params()
    s = flash_init(lp, op)
    for t in range(5):
        plan = plan_step(s, cfg, u=u_of("sss"))  # the draws would skip every layer
        assert isinstance(plan, StepPlan)
        assert plan.honest and not plan.active and not plan.weigh
        assert plan.compute.tolist() == [True, True, True] and plan.skipped == ()
        _, s, preds, dec = step(s, cfg, t, "sss", weights=torch.full((4,), 0.5))
        assert preds == (None, None, None) and dec.n_virtual == 0
    assert int(s.weighting.count) == 0  # weights are not counted while not weighing
    plan = plan_step(s, cfg, u=u_of("sss"))  # step 5: past warm-up, an honest check
    assert plan.active and plan.honest and plan.weigh and plan.compute.all()
    _, s, _, _ = step(s, cfg, 5, "sss")
    plan = plan_step(s, cfg, u=u_of("scs"))  # step 6: the draws decide
    assert plan.active and not plan.honest
    assert plan.compute.tolist() == [False, True, False] and plan.skipped == (0, 2)


# --------------------------------------------------------------------------- #
# Counters over a scripted sequence
# --------------------------------------------------------------------------- #

SCRIPT = ["ccc", "sss", "scs", "sss", "sss", "ssc", "sss", "css", "sss", "sss",
          "scs", "ccc", "sss", "ssc", "sss", "sss", "csc", "sss", "sss", "scc", "sss", "sss"]


@pytest.mark.parametrize("predictor", ["ema", "none"])
def test_counters_match_a_count_made_by_hand(predictor: str) -> None:
    warmup, every, max_skips = 3, 5, 2
    cfg = FlashConfig(warmup_steps=warmup, honest_check_every=every, max_consecutive_skips=max_skips,
                      coherence_threshold=0.0, gca_checkpoint_every=2, predictor=predictor)
    lp, op = params()
    s = flash_init(lp, op)
    streak = [0, 0, 0]
    n_skipped_layers = n_skipped_params = n_virtual = n_active = n_honest = n_nonfinite = 0
    for t, pattern in enumerate(SCRIPT):
        loss = float("nan") if t == 15 else 1.0
        plan, s, preds, dec = step(s, cfg, t, pattern, loss=loss)
        honest_step = t < warmup or (t - warmup) % every == 0
        expected = [honest_step or p == "c" or streak[i] >= max_skips for i, p in enumerate(pattern)]
        assert plan.compute.tolist() == expected, t
        assert plan.active == (t >= warmup)
        for i, computed in enumerate(expected):
            streak[i] = 0 if computed else streak[i] + 1
            if not computed:
                n_skipped_layers += 1
                n_skipped_params += SIZES[i]
                if predictor == "ema":
                    assert preds[i] is not None and [x.shape for x in preds[i]] == [x.shape for x in lp[i]]
                    assert all(bool(torch.isfinite(x).all()) for x in preds[i])
            if computed or predictor == "none":
                assert preds[i] is None
        n_virtual += dec.n_virtual
        n_active += plan.active
        n_honest += all(expected)
        n_nonfinite += math.isnan(loss)
    c = s.counters
    n = len(SCRIPT)
    assert n_skipped_layers > 0 and n_virtual > 0  # the script exercises both
    assert int(c.steps) == n and int(s.step) == n
    assert int(c.active_steps) == n_active
    assert int(c.honest_steps) == n_honest
    assert int(c.layer_steps) == 3 * n
    assert int(c.skipped_layer_steps) == n_skipped_layers
    assert float(c.param_steps) == sum(SIZES) * n
    assert float(c.skipped_param_steps) == n_skipped_params
    assert int(c.virtual_steps) == n_virtual
    assert int(c.nonfinite_steps) == n_nonfinite == 1


def test_predictor_none_gives_no_predictions() -> None:
    cfg = FlashConfig(warmup_steps=1, honest_check_every=100, predictor="none")
    lp, op = params()
    s = flash_init(lp, op)
    _, s, _, _ = step(s, cfg, 0, "ccc")
    plan, s, preds, _ = step(s, cfg, 1, "ccc")  # the honest check after warm-up
    plan, s, preds, _ = step(s, cfg, 2, "sss")
    assert plan.skipped == (0, 1, 2)
    assert preds == (None, None, None)


# --------------------------------------------------------------------------- #
# Spikes, switches
# --------------------------------------------------------------------------- #


def test_a_spike_resets_alas_activity_to_one() -> None:
    cfg = FlashConfig(warmup_steps=5, honest_check_every=1000, min_activity=0.3, activity_decay=0.8,
                      spike_cooldown_steps=10, coherence_threshold=0.0, gca_checkpoint_every=2, predictor="ema",
                      min_fidelity=0.0)
    lp, op = params()
    s = flash_init(lp, op)
    for t in range(60):
        _, s, _, _ = step(s, cfg, t, "ccc", loss=1.0)
    assert bool((s.alas.activity < 0.6).all())  # coherent, predictable gradients: activity went down
    spiked = None
    for t in range(60, 80):
        before = s
        _, s, _, _ = step(s, cfg, t, "ccc", loss=2.0)
        if int(s.safety.spikes) == 1:
            spiked = (before, s)
            break
    assert spiked is not None, "a doubled loss must be a spike"
    before, after = spiked
    assert bool((before.alas.activity < 1).all())
    assert after.alas.activity.tolist() == [1.0, 1.0, 1.0]
    assert after.alas.stability.tolist() == [0.0, 0.0, 0.0]
    assert not bool(after.gca.has_anchor)
    plan = plan_step(after, cfg, u=u_of("sss"))
    assert not plan.active and plan.honest and plan.compute.all() and not plan.weigh


def test_disabled_alas_keeps_every_step_honest() -> None:
    cfg = FlashConfig(warmup_steps=1, honest_check_every=1000, enable_alas=False)
    lp, op = params()
    s = flash_init(lp, op)
    for t in range(6):
        plan, s, preds, _ = step(s, cfg, t, "sss")
        assert plan.honest and plan.compute.all() and preds == (None, None, None)
    assert int(s.counters.skipped_layer_steps) == 0 and int(s.counters.honest_steps) == 6


def test_weights_are_counted_only_when_weighing() -> None:
    lp, op = params()
    w = torch.tensor([0.5, 1.0, 0.3])
    for enable, expected in ((True, 3 * 4), (False, 0)):
        cfg = FlashConfig(warmup_steps=2, enable_sample_weighting=enable)
        s = flash_init(lp, op)
        for t in range(6):
            plan, s, _, _ = step(s, cfg, t, "ccc", weights=w)
            assert plan.weigh == (enable and t >= 2)
        assert int(s.weighting.count) == expected


def test_gca_disabled_or_without_other_grads_decides_nothing() -> None:
    lp, op = params()
    for cfg, with_other in ((FlashConfig(warmup_steps=0, enable_gca=False, coherence_threshold=0.0), True),
                            (FlashConfig(warmup_steps=0, coherence_threshold=0.0), False)):
        s = flash_init(lp, op)
        gca0 = s.gca
        for t in range(8):
            plan = plan_step(s, cfg, u=u_of("ccc"))
            lg, og = grads(t)
            s, _, dec = flash_update(s, cfg, plan, lg, lp, 1.0, other_grads=og if with_other else None)
            assert dec == GCADecision(False, 0, False, False)
        assert s.gca is gca0 or all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(s.gca),
                                                                      optree.tree_leaves(gca0)))
        assert int(s.counters.virtual_steps) == 0


def test_plans_are_the_same_on_every_process() -> None:
    """Without ``u``, the draws come from (seed, step) only: two identical runs plan identically."""
    cfg = FlashConfig(warmup_steps=2, honest_check_every=100, seed=11)

    def run() -> List[List[bool]]:
        lp, op = params()
        s = flash_init(lp, op)
        out = []
        for t in range(12):
            plan = plan_step(s, cfg)
            out.append(plan.compute.tolist())
            lg, og = grads(t)
            layer_grads = tuple(g if bool(c) else None for g, c in zip(lg, plan.compute))
            s, _, _ = flash_update(s, cfg, plan, layer_grads, lp, 1.0, other_grads=og)
        return out

    assert run() == run()
