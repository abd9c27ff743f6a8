"""Tests for stepping back (``flashfn.core.stepback``): components turn themselves off when they are not helping.

From the pure rule (``stepback_update``) through ALAS's ``min_fidelity`` gate,
the ``plan_step``/``flash_update`` loop on small fake layers, the
``"momentum"`` predictor through the ``torch.func`` step, to the Trainer
callback's log and statistics. Every expectation is computed here by hand
(counting checks, cosines written out with plain torch).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import optree
import pytest
import torch
from helpers_models import detached, lm_per_sample_loss, token_batch
from helpers_models import tiny_gpt2 as tiny_func_gpt2
from torch.func import grad
from trainer_helpers import BATCH, run
from transformers import TrainerCallback

from flashfn import FlashConfig, FlashModeCallback
from flashfn.adapters.stats import FlashStats
from flashfn.core.alas import alas_init, alas_update
from flashfn.core.flash import FlashState, flash_init, flash_update, plan_step
from flashfn.core.stepback import (
    COMPONENTS,
    is_stepped_back,
    step_back_messages,
    stepback_init,
    stepback_update,
)
from flashfn.func import (
    BlockSkipper,
    apply_gradients,
    find_layers,
    finish_step,
    flash_init_for,
    masked_value_and_grad,
)

Tensor = torch.Tensor

# --------------------------------------------------------------------------- #
# 1. The rule itself
# --------------------------------------------------------------------------- #

#: the evidence that says "this component did not help", per component
USELESS = {"alas": dict(alas_useful=False), "weighting": dict(weighting_saved_work=False),
           "gca": dict(gca_window_virtual=0)}
#: and the evidence that says it did
USEFUL = {"alas": dict(alas_useful=True), "weighting": dict(weighting_saved_work=True),
          "gca": dict(gca_window_virtual=2)}


def _index(component: str) -> int:
    return COMPONENTS.index(component)


@pytest.mark.parametrize("component", COMPONENTS)
def test_steps_back_exactly_after_step_back_after_useless_measurements(component: str) -> None:
    k = 4
    s = stepback_init()
    for t in range(k - 1):
        s = stepback_update(s, 10 + t, step_back_after=k, **USELESS[component])
        assert not is_stepped_back(s, component), t
        assert int(s.idle[_index(component)]) == t + 1
        assert int(s.at[_index(component)]) == -1
    s = stepback_update(s, 10 + k - 1, step_back_after=k, **USELESS[component])
    assert is_stepped_back(s, component)
    assert int(s.at[_index(component)]) == 10 + k - 1  # the step the k-th measurement came from
    # only this component: the others saw no evidence and stay on
    for other in COMPONENTS:
        if other != component:
            assert not is_stepped_back(s, other)
            assert int(s.at[_index(other)]) == -1 and int(s.idle[_index(other)]) == 0


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_useful_measurement_resets_the_count(component: str) -> None:
    k = 3
    s = stepback_init()
    t = 0
    for _ in range(5):  # k - 1 useless, then a useful one, five times over: never k useless in a row
        for _ in range(k - 1):
            s = stepback_update(s, t, step_back_after=k, **USELESS[component])
            t += 1
        assert int(s.idle[_index(component)]) == k - 1
        s = stepback_update(s, t, step_back_after=k, **USEFUL[component])
        t += 1
        assert int(s.idle[_index(component)]) == 0
        assert not is_stepped_back(s, component)
    # k in a row now trips it
    for _ in range(k):
        s = stepback_update(s, t, step_back_after=k, **USELESS[component])
        t += 1
    assert is_stepped_back(s, component) and int(s.at[_index(component)]) == t - 1


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_stepped_back_component_stays_back(component: str) -> None:
    s = stepback_init()
    for t in range(2):
        s = stepback_update(s, t, step_back_after=2, **USELESS[component])
    assert is_stepped_back(s, component) and int(s.at[_index(component)]) == 1
    for t in range(2, 12):  # useful evidence afterwards changes nothing: off for the rest of the run
        s = stepback_update(s, t, step_back_after=2, **USEFUL[component])
        assert is_stepped_back(s, component) and int(s.at[_index(component)]) == 1
    for t in range(12, 16):  # nor does more useless evidence move the recorded step
        s = stepback_update(s, t, step_back_after=2, **USELESS[component])
        assert int(s.at[_index(component)]) == 1


def test_gca_steps_back_on_its_second_rollback() -> None:
    s = stepback_init()
    s = stepback_update(s, 5, step_back_after=100, gca_rollback=True)
    assert not is_stepped_back(s, "gca") and int(s.rollbacks) == 1
    for t in range(6, 20):  # useful windows in between do not forget the first rollback
        s = stepback_update(s, t, step_back_after=100, gca_window_virtual=1)
    assert not is_stepped_back(s, "gca")
    s = stepback_update(s, 20, step_back_after=100, gca_rollback=True)
    assert is_stepped_back(s, "gca") and int(s.at[_index("gca")]) == 20 and int(s.rollbacks) == 2
    assert not is_stepped_back(s, "alas") and not is_stepped_back(s, "weighting")
    msgs = step_back_messages(stepback_init(), s, FlashConfig(step_back_after=100))
    assert len(msgs) == 1 and msgs[0].startswith("Flash Mode: GCA steps back at step 20")
    assert "2 rollbacks" in msgs[0]


def test_step_back_after_zero_never_steps_back() -> None:
    s0 = stepback_init()
    s = s0
    for t in range(50):
        s = stepback_update(s, t, step_back_after=0, alas_useful=False, weighting_saved_work=False,
                            gca_window_virtual=0, gca_rollback=True)
    assert s.off.tolist() == [False, False, False]
    assert s.at.tolist() == [-1, -1, -1]
    assert s.idle.tolist() == [0, 0, 0] and int(s.rollbacks) == 0


def test_none_evidence_changes_nothing() -> None:
    k = 3
    s = stepback_init()
    s = stepback_update(s, 0, step_back_after=k, alas_useful=False, weighting_saved_work=False, gca_window_virtual=0)
    assert s.idle.tolist() == [1, 1, 1]
    before = s
    for t in range(1, 30):  # no measurement at all: neither counts as useless nor resets the count
        s = stepback_update(s, t, step_back_after=k)
        for a, b in zip(before, s):
            assert torch.equal(a, b), t
    s = stepback_update(s, 30, step_back_after=k, alas_useful=False, weighting_saved_work=False, gca_window_virtual=0)
    assert s.idle.tolist() == [2, 2, 2] and not bool(s.off.any())
    s = stepback_update(s, 31, step_back_after=k, alas_useful=False, weighting_saved_work=False, gca_window_virtual=0)
    assert s.off.tolist() == [True, True, True] and s.at.tolist() == [31, 31, 31]


# --------------------------------------------------------------------------- #
# 2. alas_update's min_fidelity gate
# --------------------------------------------------------------------------- #

# one gradient per layer, and predictions of exactly known cosine to it (every norm and dot product is exact)
G = torch.tensor([1.0, 1.0, 1.0, 1.0])  # norm 2
PRED_BELOW = torch.tensor([1.0, -1.0, 1.0, -1.0])  # cosine 0
PRED_AT = torch.tensor([2.0, 0.0, 0.0, 0.0])  # cosine 2 / (2 * 2) = 0.5
PRED_ABOVE = torch.tensor([1.0, 1.0, 1.0, 1.0])  # cosine 1


def _alas_run(min_fidelity: float, steps: int = 20):
    params = tuple((torch.ones(4),) for _ in range(3))  # identical layers: identical heat, so ``cold`` is 1
    s = alas_init(params, history=False)
    history = []
    for _ in range(steps):
        s = alas_update(s, tuple((G.clone(),) for _ in range(3)), params, min_fidelity=min_fidelity,
                        predicted=((PRED_BELOW,), (PRED_AT,), (PRED_ABOVE,)))
        history.append(s)
    return history


def test_alas_layers_at_or_below_min_fidelity_are_never_skipped() -> None:
    hist = _alas_run(min_fidelity=0.5)
    for s in hist:
        assert s.fidelity.tolist() == [0.0, 0.5, 1.0]
        # at and below min_fidelity: stability exactly 0, activity exactly 1 (u < 1 for every draw: never skipped)
        assert s.stability[:2].tolist() == [0.0, 0.0]
        assert s.activity[:2].tolist() == [1.0, 1.0]
    # above it: stability rises and activity falls, step after step
    stab = [float(s.stability[2]) for s in hist]
    act = [float(s.activity[2]) for s in hist]
    assert all(b > a for a, b in zip(stab, stab[1:])) and stab[0] > 0
    assert all(b < a for a, b in zip(act, act[1:])) and act[0] < 1.0


def test_alas_same_fidelity_counts_when_min_fidelity_is_lower() -> None:
    """The gate is min_fidelity itself: the layer of cosine 0.5 becomes skippable with min_fidelity=0.25."""
    hist = _alas_run(min_fidelity=0.25)
    last = hist[-1]
    assert last.stability[0] == 0.0 and last.activity[0] == 1.0  # cosine 0 is still below
    assert float(last.stability[1]) > 0.0 and float(last.activity[1]) < 1.0
    assert float(last.stability[1]) < float(last.stability[2])  # and less predictable than the exact one


# --------------------------------------------------------------------------- #
# 3. plan_step / flash_update on small fake layers
# --------------------------------------------------------------------------- #

N_LAYERS, LAYER_SIZE, OTHER_SIZE = 3, 256, 32
WARMUP, EVERY, AFTER = 4, 3, 3
# the highest draws ALAS can make (uniform in [0, 1)): a layer computes only while its activity is exactly 1
HIGH_U = torch.full((N_LAYERS,), 1.0 - 2.0**-40, dtype=torch.float64)


def _params():
    g = torch.Generator().manual_seed(0)
    layers = tuple((torch.randn(LAYER_SIZE // 4, 4, generator=g),) for _ in range(N_LAYERS))
    other = (torch.randn(OTHER_SIZE, generator=g),)
    return layers, other


def _random_grads(t: int):
    """Independent gradients every step: nothing to predict, nothing coherent."""
    g = torch.Generator().manual_seed(1000 + t)
    layers = tuple((torch.randn(LAYER_SIZE // 4, 4, generator=g),) for _ in range(N_LAYERS))
    return layers, (torch.randn(OTHER_SIZE, generator=g),)


def _coherent_grads(t: int):
    """The same gradient every step: perfectly predictable."""
    return _random_grads(-1)


def _cfg(**kw: Any) -> FlashConfig:
    base = dict(warmup_steps=WARMUP, honest_check_every=EVERY, step_back_after=AFTER, enable_gca=False,
                enable_sample_weighting=False, verbose=False, predictor="ema")
    base.update(kw)
    return FlashConfig(**base)


def _step(state: FlashState, cfg: FlashConfig, grads, *, u: Optional[Tensor] = None, weights=None,
          with_gca: bool = False, loss: float = 1.0, prev=None):
    """One planned step; with ``predictor="momentum"`` the previous step's gradients stand in for the first moment."""
    lp, _ = _params()
    lg, og = grads
    plan = plan_step(state, cfg, u=u)
    layer_grads = tuple(g if bool(c) else None for g, c in zip(lg, plan.compute))
    predicted = prev[0] if cfg.predictor == "momentum" and prev is not None else None
    new, _, decision = flash_update(state, cfg, plan, layer_grads, lp, loss, other_grads=og if with_gca else None,
                                    weights=weights if plan.weigh else None, predicted=predicted)
    return plan, new, decision


def _run(state: FlashState, cfg: FlashConfig, t: int, grads_of, *, u: Optional[Tensor] = None):
    """Step ``t`` on the gradients ``grads_of(t)`` (the stand-in first moment: ``grads_of(t - 1)``)."""
    return _step(state, cfg, grads_of(t), u=u, prev=grads_of(t - 1) if t > 0 else None)


def _init(cfg: FlashConfig) -> FlashState:
    lp, op = _params()
    return flash_init(lp, op, with_gca=cfg.enable_gca)


def _total_params() -> int:
    return N_LAYERS * LAYER_SIZE + OTHER_SIZE


def _tree_equal(a, b) -> bool:
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("predictor", ["ema", "momentum"])
def test_alas_steps_back_on_unpredictable_gradients_then_stays_out(predictor: str) -> None:
    cfg = _cfg(predictor=predictor)
    s = _init(cfg)
    expected_at = WARMUP + (AFTER - 1) * EVERY + 1  # the AFTER-th honest check past warm-up, counted as steps done
    t = 0
    while t < expected_at:
        plan, s, _ = _run(s, cfg, t, _random_grads, u=HIGH_U)
        t += 1
        # measured fidelity never above min_fidelity: activity stays 1, nothing is skipped even on the highest draws
        assert plan.compute.all(), t
        if t > 1:  # measured from the second step on (nothing to predict from on the first; momentum: the
            # warm-up's check at step 1 measures, then only the checks do)
            assert bool(torch.isfinite(s.alas.fidelity).all())
            assert float(s.alas.fidelity.max()) < cfg.min_fidelity
        assert is_stepped_back(s.stepback, "alas") == (t == expected_at), t
    assert int(s.stepback.at[_index("alas")]) == expected_at
    stats = FlashStats.compute(s, None, _total_params())
    assert stats["stepped_back"] == {"alas": expected_at, "weighting": None, "gca": None}
    assert f"Stepped back (not helping): ALAS @ {expected_at}" in stats.box()
    # from now on the gradients become perfectly predictable: ALAS would skip (see the next test), but it is out
    frozen = s.alas
    for t in range(expected_at, expected_at + 40):
        plan, s, _ = _run(s, cfg, t, _coherent_grads, u=HIGH_U)
        assert plan.honest and plan.compute.all(), t
        assert _tree_equal(s.alas, frozen), t  # its bookkeeping stopped
    assert int(s.counters.skipped_layer_steps) == 0
    assert int(s.stepback.at[_index("alas")]) == expected_at


@pytest.mark.parametrize("predictor", ["ema", "momentum"])
def test_alas_does_not_step_back_on_coherent_gradients_and_skips(predictor: str) -> None:
    cfg = _cfg(predictor=predictor)
    s = _init(cfg)
    n_checks = 0
    for t in range(60):
        _, s, _ = _run(s, cfg, t, _coherent_grads)
        n_checks += t >= WARMUP and (t - WARMUP) % EVERY == 0
    assert n_checks > 3 * AFTER
    assert not is_stepped_back(s.stepback, "alas") and int(s.stepback.idle[_index("alas")]) == 0
    assert float(s.alas.fidelity.min()) > 0.99
    assert int(s.counters.skipped_layer_steps) > 0
    assert FlashStats.compute(s, None, _total_params())["stepped_back"]["alas"] is None


@pytest.mark.parametrize("predictor", ["ema", "momentum"])
def test_alas_stepped_back_after_it_had_learned_to_skip_never_skips_again(predictor: str) -> None:
    """ALAS learns to skip, the gradients turn unpredictable, it steps back: its frozen activity (< 1) is ignored."""
    cfg = _cfg(predictor=predictor)
    s = _init(cfg)
    switch = WARMUP + 8 * EVERY  # coherent gradients up to here (an honest check falls on the switch itself)
    expected_at = switch + (AFTER - 1) * EVERY + 1
    for t in range(expected_at):
        _, s, _ = _run(s, cfg, t, lambda k: _coherent_grads(k) if k < switch else _random_grads(k), u=HIGH_U)
        assert is_stepped_back(s.stepback, "alas") == (t + 1 == expected_at), t
    assert int(s.counters.skipped_layer_steps) > 0  # it did skip while the gradients were predictable
    frozen = s.alas
    assert float(frozen.activity.max()) < 1.0  # left as it was: these draws would still skip every layer ...
    assert plan_step(s._replace(stepback=stepback_init()), cfg, u=HIGH_U).skipped == (0, 1, 2)
    skipped_before = int(s.counters.skipped_layer_steps)
    for t in range(expected_at, expected_at + 30):  # ... but ALAS is out: every step is honest, its state frozen
        plan, s, _ = _run(s, cfg, t, _coherent_grads, u=HIGH_U)
        assert plan.honest and plan.compute.all(), t
        assert _tree_equal(s.alas, frozen), t
    assert int(s.counters.skipped_layer_steps) == skipped_before
    assert int(s.stepback.at[_index("alas")]) == expected_at


def test_weighting_steps_back_when_every_weight_is_one_too() -> None:
    cfg = _cfg(enable_alas=False, enable_sample_weighting=True)
    s = _init(cfg)
    for t in range(WARMUP + AFTER + 10):
        plan, s, _ = _step(s, cfg, _random_grads(t), weights=torch.ones(4))
        active = t >= WARMUP
        weighing = active and t < WARMUP + AFTER
        assert plan.weigh == weighing, t
    assert int(s.stepback.at[_index("weighting")]) == WARMUP + AFTER
    assert int(s.weighting.count) == AFTER * 4  # no weights counted once it stepped back
    assert FlashStats.compute(s, None, _total_params())["stepped_back"]["weighting"] == WARMUP + AFTER


def test_weighting_that_acts_steps_back_too_it_saves_no_work() -> None:
    """Re-weighting never saves work: even when it changes weights it steps back after step_back_after steps."""
    cfg = _cfg(enable_alas=False, enable_sample_weighting=True)
    s = _init(cfg)
    weights = torch.tensor([1.0, 1.0, 0.5, 1.0])
    for t in range(WARMUP + 4 * AFTER):
        plan, s, _ = _step(s, cfg, _random_grads(t), weights=weights)
        assert plan.weigh == (WARMUP <= t < WARMUP + AFTER), t
    assert int(s.stepback.at[_index("weighting")]) == WARMUP + AFTER
    assert int(s.weighting.count) == AFTER * 4 and int(s.weighting.low_count) == AFTER


def test_weighting_stays_on_with_step_back_after_zero() -> None:
    cfg = _cfg(enable_alas=False, enable_sample_weighting=True, step_back_after=0)
    s = _init(cfg)
    weights = torch.tensor([1.0, 1.0, 0.5, 1.0])
    for t in range(WARMUP + 4 * AFTER):
        plan, s, _ = _step(s, cfg, _random_grads(t), weights=weights)
        assert plan.weigh == (t >= WARMUP)
    assert not bool(s.stepback.off.any())
    assert int(s.weighting.count) == 4 * AFTER * 4


def _gca_windows(steps: int, checkpoint_every: int) -> List[int]:
    """The steps (0-based) whose update closes a checkpoint window counted as evidence: past warm-up, with an anchor."""
    ckpts = [t for t in range(steps) if (t + 1) % checkpoint_every == 0]
    return [t for t in ckpts[1:] if t >= WARMUP]


def test_gca_steps_back_when_coherence_never_reaches_the_threshold() -> None:
    cfg = _cfg(enable_alas=False, enable_gca=True, gca_checkpoint_every=2)
    s = _init(cfg)
    steps = 30
    windows = _gca_windows(steps, cfg.gca_checkpoint_every)
    expected_at = windows[AFTER - 1] + 1
    for t in range(steps):
        _, s, dec = _step(s, cfg, _random_grads(t), with_gca=True)
        assert dec.n_virtual == 0
        if t < expected_at:
            assert float(s.gca.coherence) < cfg.coherence_threshold
        assert is_stepped_back(s.stepback, "gca") == (t + 1 >= expected_at), t
    assert int(s.stepback.at[_index("gca")]) == expected_at
    assert int(s.counters.virtual_steps) == 0
    assert FlashStats.compute(s, None, _total_params())["stepped_back"]["gca"] == expected_at
    # once back, coherent gradients (which make GCA take virtual steps, see below) change nothing: GCA is out
    frozen = s.gca
    for t in range(steps, steps + 30):
        _, s, dec = _step(s, cfg, _coherent_grads(t), with_gca=True)
        assert dec == (False, 0, False, False), t
        assert _tree_equal(s.gca, frozen), t
    assert int(s.counters.virtual_steps) == 0
    # the same sequence with step_back_after=0: GCA stays on and takes virtual steps on the coherent part
    cfg0 = cfg.replace(step_back_after=0)
    s0 = _init(cfg0)
    for t in range(steps + 30):
        _, s0, _ = _step(s0, cfg0, _random_grads(t) if t < steps else _coherent_grads(t), with_gca=True)
    assert int(s0.counters.virtual_steps) > 0 and not bool(s0.stepback.off.any())


def test_gca_taking_virtual_steps_does_not_step_back() -> None:
    cfg = _cfg(enable_alas=False, enable_gca=True, gca_checkpoint_every=2, coherence_threshold=-1.0)
    s = _init(cfg)
    for t in range(30):
        _, s, _ = _step(s, cfg, _random_grads(t), with_gca=True)
    assert int(s.counters.virtual_steps) > 0 and int(s.gca.rollbacks) == 0
    assert not is_stepped_back(s.stepback, "gca") and int(s.stepback.idle[_index("gca")]) == 0
    assert FlashStats.compute(s, None, _total_params())["stepped_back"]["gca"] is None


# --------------------------------------------------------------------------- #
# 4. The "momentum" predictor through the torch.func step
# --------------------------------------------------------------------------- #

M_WARMUP, M_EVERY = 2, 3  # honest checks (the only measurements) at steps 2, 5, 8, ...


class MomentumLoop:
    """The custom loop of ``flashfn.func.step`` with ``predictor="momentum"`` and a real AdamW."""

    def __init__(self) -> None:
        self.cfg = FlashConfig(predictor="momentum", warmup_steps=M_WARMUP, honest_check_every=M_EVERY,
                               min_fidelity=0.0, step_back_after=0, enable_gca=False,
                               enable_sample_weighting=False, verbose=False)
        self.model = tiny_func_gpt2(4, seed=0)
        self.lmap = find_layers(self.model)
        self.skipper = BlockSkipper(self.model, self.lmap, "branch")
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        self.psl = lm_per_sample_loss(self.model)
        self.state = flash_init_for(self.model, self.lmap, self.params, cfg=self.cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.t = 0

    def exp_avg(self) -> Dict[str, Tensor]:
        return {n: self.opt.state[p]["exp_avg"] for n, p in self.params.items() if p in self.opt.state}

    def step(self, u: Optional[Tensor] = None, clip_skipped: bool = False) -> Dict[str, Any]:
        ids = token_batch(4, seed=100 + self.t)
        ref = grad(lambda p: self.psl(p, self.buffers, ids).mean())(detached(self.model))  # independent of flashfn
        m_before = {n: m.detach().clone() for n, m in self.exp_avg().items()}
        before = self.state
        plan = plan_step(self.state, self.cfg, u=u)
        grads, loss, aux = masked_value_and_grad(self.psl, self.params, self.buffers, ids, lmap=self.lmap,
                                                 plan=plan, skipper=self.skipper)
        self.state, full, _ = finish_step(self.state, self.cfg, plan, self.lmap, self.params, grads, loss,
                                          aux.weights, optimizer=self.opt)
        rec = dict(plan=plan, before=before, grads=dict(grads), full=full, ref=ref, m_before=m_before,
                   m_live={n: m for n, m in self.exp_avg().items()})
        if clip_skipped:  # clipping the injected gradients in place, as a training loop may
            for i in plan.skipped:
                for n in self.lmap.params[i]:
                    full[n].mul_(0.01)
            rec["m_after_clip"] = {n: m.detach().clone() for n, m in self.exp_avg().items()}
        apply_gradients(self.params, full)
        self.opt.step()
        self.opt.zero_grad()
        self.t += 1
        return rec


def _cos64(a: List[Tensor], b: List[Tensor]) -> float:
    x = torch.cat([t.reshape(-1).double() for t in a])
    y = torch.cat([t.reshape(-1).double() for t in b])
    return float(x @ y / (x.norm() * y.norm()))


@pytest.fixture(scope="module")
def momentum_run() -> Tuple[MomentumLoop, List[Dict[str, Any]]]:
    torch.set_num_threads(1)
    loop = MomentumLoop()
    recs = []
    for t in range(8):  # steps 0-7: warm-up 0-1, honest checks at 2 and 5, layers 1 and 3 skipped at 3, 4, 6, 7
        u = None if t < 3 or t == 5 else torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
        recs.append(loop.step(u, clip_skipped=t == 3))
    return loop, recs


def test_momentum_keeps_no_gradient_history(momentum_run) -> None:
    loop, _ = momentum_run
    a = loop.state.alas
    assert all(x.numel() == 0 for x in (*a.avg, *a.last, *a.prev))
    total = sum(p.numel() for p in loop.params.values())
    stats = FlashStats.compute(loop.state, None, total)
    assert stats["alas_history_bytes"] == 0
    # an "ema" state of the same model holds three copies of the blocks' parameters
    ema = flash_init_for(loop.model, loop.lmap, loop.params, cfg=loop.cfg.replace(predictor="ema"))
    block_params = sum(loop.params[n].numel() for names in loop.lmap.params for n in names)
    assert FlashStats.compute(ema, None, total)["alas_history_bytes"] == 3 * 4 * block_params


def test_momentum_skipped_layer_gets_a_copy_of_exp_avg(momentum_run) -> None:
    loop, recs = momentum_run
    rec = recs[3]
    assert rec["plan"].skipped == (1, 3)
    for i in rec["plan"].skipped:
        for n in loop.lmap.params[i]:
            g, m = rec["full"][n], rec["m_live"][n]
            # the prediction was the optimizer's first moment as it stood before this step ...
            assert torch.equal(rec["m_before"][n], rec["m_after_clip"][n]), n
            # ... handed out as a copy: the loop scaled it by 0.01 in place and the optimizer's own did not move
            assert torch.equal(g, rec["m_before"][n] * 0.01), n
            assert g.untyped_storage().data_ptr() != m.untyped_storage().data_ptr(), n
    # the computed layers keep the gradients they computed, not the moment
    for i in (0, 2):
        for n in loop.lmap.params[i]:
            assert torch.equal(rec["full"][n], rec["grads"][n]), n
            assert not torch.equal(rec["full"][n], rec["m_before"][n]), n


@pytest.mark.parametrize("check_step", [2, 5])
def test_momentum_fidelity_is_the_cosine_of_exp_avg_and_the_real_gradient(momentum_run, check_step: int) -> None:
    loop, recs = momentum_run
    rec = recs[check_step]
    assert rec["plan"].honest
    after = recs[check_step + 1]["before"] if check_step + 1 < len(recs) else loop.state
    expected = [_cos64([rec["m_before"][n] for n in names], [rec["ref"][n] for n in names])
                for names in loop.lmap.params]
    got = after.alas.fidelity.tolist()
    assert got == pytest.approx(expected, abs=2e-5)
    assert min(expected) < 0.999  # a real measurement, not a trivially perfect one
    # the statistics report their mean
    stats = FlashStats.compute(after, None, sum(p.numel() for p in loop.params.values()))
    assert stats["alas_mean_fidelity"] == pytest.approx(sum(expected) / len(expected), abs=2e-5)


def test_momentum_measures_nothing_off_the_honest_checks(momentum_run) -> None:
    loop, recs = momentum_run
    states = [r["before"] for r in recs] + [loop.state]  # states[t]: before step t
    # nothing measured before the first check (warm-up steps 0 and 1 are not checks)
    assert bool(torch.isnan(states[2].alas.fidelity).all())
    for t in (3, 4, 6, 7):  # after non-check steps: every measured quantity is unchanged
        for field in ("fidelity", "stability", "heat", "observed"):
            assert torch.equal(getattr(states[t + 1].alas, field), getattr(states[t].alas, field)), (t, field)
    for t in (2, 5):  # each check changed the fidelity
        assert bool(torch.isfinite(states[t + 1].alas.fidelity).all())
        assert not torch.equal(states[t + 1].alas.fidelity, states[t].alas.fidelity)


# --------------------------------------------------------------------------- #
# 5. Through the Trainer callback
# --------------------------------------------------------------------------- #

T_WARMUP, T_AFTER, T_STEPS = 4, 3, 12


def test_trainer_logs_weighting_stepping_back_once(tmp_path) -> None:
    # a byte-level LM's per-sample losses stay far above the default low_loss_threshold: weights all stay 1
    cb = FlashModeCallback(FlashConfig(warmup_steps=T_WARMUP, step_back_after=T_AFTER, enable_gca=False,
                                       verbose=False))
    run(tmp_path, T_STEPS, [cb])
    stats = cb.get_stats()
    msgs = [e for e in cb.events if "sample weighting steps back" in e]
    assert len(msgs) == 1
    assert f"steps back at step {T_WARMUP + T_AFTER} " in msgs[0]
    assert stats["stepped_back"]["weighting"] == T_WARMUP + T_AFTER
    assert stats["samples_weighted"] == T_AFTER * BATCH and stats["samples_down_weighted"] == 0
    assert f"Weighting @ {T_WARMUP + T_AFTER}" in stats.box()


def test_trainer_with_step_back_after_zero_keeps_everything_on(tmp_path) -> None:
    cb = FlashModeCallback(FlashConfig(warmup_steps=T_WARMUP, step_back_after=0, enable_gca=False, verbose=False))
    run(tmp_path, T_STEPS, [cb])
    stats = cb.get_stats()
    assert not any("steps back" in e for e in cb.events)
    assert stats["stepped_back"] == {"alas": None, "weighting": None, "gca": None}
    assert stats["samples_weighted"] == (T_STEPS - T_WARMUP) * BATCH
    assert "Stepped back" not in stats.box()


class MomentRecorder(TrainerCallback):
    """After ``FlashModeCallback`` in the list: per step, the plan, the gradients and the optimizer's ``exp_avg``."""

    def __init__(self, flash: FlashModeCallback) -> None:
        self.flash = flash
        self.steps: List[Dict[str, Any]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                              **kwargs: Any):
        inner = getattr(optimizer, "optimizer", optimizer)
        named = dict(model.named_parameters())
        self.steps.append(dict(
            skipped=self.flash._plan.skipped,
            grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in named.items()},
            exp_avg={n: inner.state[p]["exp_avg"].detach().clone() for n, p in named.items() if p in inner.state}))


def test_trainer_momentum_predictor_reads_the_optimizers_first_moment(tmp_path) -> None:
    """Through the Trainer the "momentum" predictor measures at the honest checks and predicts with exp_avg."""
    cb = FlashModeCallback(FlashConfig(predictor="momentum", warmup_steps=2, honest_check_every=2, min_fidelity=0.0,
                                       min_activity=0.1, activity_decay=0.5, step_back_after=0, enable_gca=False,
                                       enable_sample_weighting=False, verbose=False))
    rec = MomentRecorder(cb)
    run(tmp_path, 24, [cb, rec], max_grad_norm=0.0)  # no clipping: the injected gradients stay as predicted
    stats = cb.get_stats()
    assert stats["alas_history_bytes"] == 0
    assert bool(torch.isfinite(cb.state.alas.fidelity).all())  # every layer measured against exp_avg
    assert stats["alas_mean_fidelity"] is not None
    skipping = [r for r in rec.steps if r["skipped"]]
    assert skipping, "ALAS never skipped a layer"
    for r in skipping:
        for i in r["skipped"]:
            for n in cb.lmap.params[i]:
                assert torch.equal(r["grads"][n], r["exp_avg"][n]), n
