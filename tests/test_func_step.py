"""Tests for ``flashfn.func.step``: the masked gradient, ``finish_step``, ``apply_gradients`` and the GCA helpers.

References are computed here independently: plain ``torch.func.grad`` of the
mean loss, the interpolation formula written out, plain ``torch.optim`` loops.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import optree
import pytest
import torch
from helpers_models import detached, lm_per_sample_loss, tiny_gpt2, token_batch
from torch import nn
from torch.func import grad
from torch.utils.flop_counter import FlopCounterMode

from flashfn.config import FlashConfig
from flashfn.core.alas import interpolate, unflatten
from flashfn.core.flash import StepPlan, plan_step
from flashfn.core.gca import GCADecision
from flashfn.func import (
    BlockSkipper,
    apply_gradients,
    find_layers,
    finish_step,
    flash_init_for,
    gca_after_step,
    masked_value_and_grad,
    take_snapshot,
    virtual_steps,
)

Tensor = torch.Tensor
N_LAYER = 4
SKIP_1_3 = torch.tensor([0.0, 1.0, 0.0, 1.0])  # ALAS draws: u=1 is never < activity, u=0 always is


def _cfg(**kw: Any) -> FlashConfig:
    base = dict(warmup_steps=2, honest_check_every=50, enable_sample_weighting=False, enable_gca=False,
                verbose=False, predictor="ema")
    base.update(kw)
    return FlashConfig(**base)


class Loop:
    """The custom loop of ``flashfn.func.step``'s docstring on a tiny GPT-2, one step at a time."""

    def __init__(self, cfg: FlashConfig, mechanism: Optional[str] = "branch", seed: int = 0) -> None:
        self.cfg = cfg
        self.model = tiny_gpt2(N_LAYER, seed=seed)
        self.lmap = find_layers(self.model)
        self.skipper = None if mechanism is None else BlockSkipper(self.model, self.lmap, mechanism)
        self.params = dict(self.model.named_parameters())
        self.buffers = dict(self.model.named_buffers())
        self.psl = lm_per_sample_loss(self.model)
        self.state = flash_init_for(self.model, self.lmap, self.params, cfg=cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.snap = None
        self.t = 0
        self.log: List[Dict[str, Any]] = []

    def batch(self) -> Tensor:
        return token_batch(4, seed=100 + self.t)

    def reference_grads(self, ids: Tensor) -> Dict[str, Tensor]:
        """Plain gradient of the plain mean loss at the current parameters (independent of flashfn)."""
        return grad(lambda p: self.psl(p, self.buffers, ids).mean())(detached(self.model))

    def plan(self, u: Optional[Tensor] = None) -> StepPlan:
        return plan_step(self.state, self.cfg, u=u)

    def step(self, u: Optional[Tensor] = None, *, with_reference: bool = False) -> Dict[str, Any]:
        ids = self.batch()
        ref = self.reference_grads(ids) if with_reference else None
        before = self.state
        plan = self.plan(u)
        grads, loss, aux = masked_value_and_grad(self.psl, self.params, self.buffers, ids, lmap=self.lmap,
                                                 plan=plan, skipper=self.skipper,
                                                 min_sample_weight=self.cfg.min_sample_weight,
                                                 low_loss_threshold=self.cfg.low_loss_threshold)
        self.state, full, decision = finish_step(self.state, self.cfg, plan, self.lmap, self.params, grads, loss,
                                                 aux.weights, optimizer=self.opt)
        apply_gradients(self.params, full)
        self.opt.step()
        self.opt.zero_grad()
        self.snap = gca_after_step(decision, self.params, self.opt, self.snap)
        rec = dict(plan=plan, grads=grads, full=full, loss=loss, before=before, decision=decision, ref=ref)
        self.log.append(rec)
        self.t += 1
        return rec


def _layer_names(lmap, layers) -> set:
    return {n for i in layers for n in lmap.params[i]}


# --------------------------------------------------------------------------- #
# masked_value_and_grad: a skipped layer's gradient is not computed
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def warmed() -> Loop:
    """A loop past warm-up and its first honest check (steps 0-2), so ALAS may skip on step 3."""
    torch.set_num_threads(1)
    loop = Loop(_cfg())
    for _ in range(3):
        loop.step()
    return loop


def test_plan_with_u_override_skips_chosen_layers(warmed: Loop) -> None:
    plan = warmed.plan(SKIP_1_3)
    assert plan.active and not plan.honest
    assert plan.skipped == (1, 3)


@pytest.mark.parametrize("mechanism", [None, "branch", "freeze"])
def test_masked_grads_leave_skipped_layers_out(warmed: Loop, mechanism: Optional[str]) -> None:
    loop = warmed
    plan = loop.plan(SKIP_1_3)
    skipper = None if mechanism is None else BlockSkipper(loop.model, loop.lmap, mechanism)
    ids = loop.batch()
    try:
        grads, loss, aux = masked_value_and_grad(loop.psl, loop.params, loop.buffers, ids, lmap=loop.lmap,
                                                 plan=plan, skipper=skipper)
        assert skipper is None or skipper.skipped == frozenset()
    finally:
        if skipper is not None:
            skipper.remove()
    skipped = _layer_names(loop.lmap, [1, 3])
    assert set(grads) == set(loop.params) - skipped
    assert aux.weights is None
    ref_losses = loop.psl(detached(loop.model), loop.buffers, ids)
    torch.testing.assert_close(aux.losses, ref_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_losses.mean(), rtol=1e-6, atol=1e-6)
    ref = loop.reference_grads(ids)
    if mechanism != "branch":
        # only the weight gradients of the skipped layers are left out: every other gradient is exact
        for k, g in grads.items():
            assert torch.equal(g, ref[k]), k
    else:
        # the gradient below a skipped branch loses its Jacobian; above the top skipped layer (3) it is kept
        for layer in (0, 2):
            assert max(float((grads[k] - ref[k]).abs().max()) for k in loop.lmap.params[layer]) > 1e-4
        for k in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-6)


def _flops(loop: Loop, plan: StepPlan, skipper: Optional[BlockSkipper]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        masked_value_and_grad(loop.psl, loop.params, loop.buffers, loop.batch(), lmap=loop.lmap, plan=plan,
                              skipper=skipper)
    return counter.get_total_flops()


def test_masked_step_saves_flops(warmed: Loop) -> None:
    loop = warmed
    honest = StepPlan(True, True, torch.ones(N_LAYER, dtype=torch.bool), False)
    plan = loop.plan(SKIP_1_3)
    branch = BlockSkipper(loop.model, loop.lmap, "branch")
    try:
        full_with_hooks = _flops(loop, honest, branch)
        skipped_branch = _flops(loop, plan, branch)
    finally:
        branch.remove()
    full = _flops(loop, honest, None)
    skipped_subset = _flops(loop, plan, None)
    assert full_with_hooks == full  # the hooks cost nothing when nothing is skipped
    assert skipped_branch < skipped_subset < full


def test_skipper_cleared_when_the_loss_raises(warmed: Loop) -> None:
    loop = warmed
    sk = BlockSkipper(loop.model, loop.lmap, "branch")

    def bad(params, buffers, batch):
        raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            masked_value_and_grad(bad, loop.params, loop.buffers, loop.batch(), lmap=loop.lmap,
                                  plan=loop.plan(SKIP_1_3), skipper=sk)
        assert sk.skipped == frozenset()
    finally:
        sk.remove()


def test_weighted_plan_gradient(warmed: Loop) -> None:
    loop = warmed
    plan = loop.plan(SKIP_1_3)._replace(weigh=True)
    ids = loop.batch()
    min_w, thr = 0.3, 5.0
    grads, loss, aux = masked_value_and_grad(loop.psl, loop.params, loop.buffers, ids, lmap=loop.lmap, plan=plan,
                                             min_sample_weight=min_w, low_loss_threshold=thr)
    ref_losses = loop.psl(detached(loop.model), loop.buffers, ids)
    expected_w = (min_w + (1 - min_w) * ref_losses / thr).clamp(max=1.0)
    assert bool((expected_w < 1).all()) and float(expected_w.max() - expected_w.min()) > 0
    torch.testing.assert_close(aux.weights, expected_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_losses.mean(), rtol=1e-6, atol=1e-6)  # the plain loss is reported
    frozen = _layer_names(loop.lmap, [1, 3])
    p0 = detached(loop.model)
    diff = {k: v for k, v in p0.items() if k not in frozen}
    const = {k: v for k, v in p0.items() if k in frozen}
    ref = grad(lambda d: (expected_w * loop.psl({**const, **d}, loop.buffers, ids)).sum() / ids.shape[0])(diff)
    assert set(grads) == set(ref)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- #
# finish_step: interpolated gradients for skipped layers, real ones elsewhere
# --------------------------------------------------------------------------- #


def test_finish_step_interpolates_skipped_layers() -> None:
    loop = Loop(_cfg(), mechanism=None)
    for _ in range(3):
        loop.step()
    rec = loop.step(SKIP_1_3, with_reference=True)
    assert rec["plan"].skipped == (1, 3)
    before = rec["before"]
    preds = interpolate(before.alas, [1, 3], trend_weight=loop.cfg.trend_weight, noise_scale=loop.cfg.noise_scale,
                        seed=loop.cfg.seed)
    full, grads, ref = rec["full"], rec["grads"], rec["ref"]
    assert set(full) == set(loop.params)
    for layer, pred in zip([1, 3], preds):
        shaped = unflatten(pred, [loop.params[n] for n in loop.lmap.params[layer]])
        for name, p in zip(loop.lmap.params[layer], shaped):
            assert torch.equal(full[name], p), name
            assert not torch.equal(full[name], ref[name]), name  # a prediction, not the real gradient
    for name in set(loop.params) - _layer_names(loop.lmap, [1, 3]):
        assert torch.equal(full[name], grads[name]), name
        assert torch.equal(full[name], ref[name]), name  # the real gradient


def test_finish_step_prediction_formula() -> None:
    # without noise the prediction is the decayed average of the real gradients plus the trend term
    cfg = _cfg(noise_scale=0.0, interp_decay=0.8, trend_weight=0.3)
    loop = Loop(cfg, mechanism=None)
    history = [loop.step()["grads"] for _ in range(3)]
    rec = loop.step(SKIP_1_3)
    d, tw = cfg.interp_decay, cfg.trend_weight
    for layer in (1, 3):
        for name in loop.lmap.params[layer]:
            g1, g2, g3 = (h[name].double() for h in history)
            avg = (d * d * g1 + d * g2 + g3) / (1 + d + d * d)
            expected = avg + tw * (g3 - g2)
            torch.testing.assert_close(rec["full"][name].double(), expected, rtol=1e-5, atol=1e-8)


def test_predictor_none_leaves_skipped_layers_untouched() -> None:
    loop = Loop(_cfg(predictor="none"), mechanism="branch")
    for _ in range(3):
        loop.step()
    ids = loop.batch()
    plan = loop.plan(SKIP_1_3)
    grads, loss, aux = masked_value_and_grad(loop.psl, loop.params, loop.buffers, ids, lmap=loop.lmap, plan=plan,
                                             skipper=loop.skipper)
    _, full, _ = finish_step(loop.state, loop.cfg, plan, loop.lmap, loop.params, grads, loss, aux.weights)
    skipped = _layer_names(loop.lmap, [1, 3])
    assert set(full) == set(loop.params) - skipped
    for p in loop.params.values():  # stale gradients would be a bug too
        p.grad = torch.ones_like(p)
    apply_gradients(loop.params, full)
    for name, p in loop.params.items():
        if name in skipped:
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, full[name]), name
    opt = torch.optim.AdamW(loop.model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {k: v.detach().clone() for k, v in loop.params.items()}
    opt.step()
    for name, p in loop.params.items():
        if name in skipped:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), name


def test_predictor_ema_moves_skipped_layers() -> None:
    # the contrast to the test above: with a prediction the skipped layers do get a gradient and move
    loop = Loop(_cfg(predictor="ema"), mechanism="branch")
    for _ in range(3):
        loop.step()
    before = {k: v.detach().clone() for k, v in loop.params.items()}
    rec = loop.step(SKIP_1_3)
    assert rec["plan"].skipped == (1, 3)
    for name in _layer_names(loop.lmap, [1, 3]):
        assert not torch.equal(loop.params[name], before[name]), name


def test_honest_check_steps_use_real_gradients() -> None:
    # warm-up 2, honest check every 3: steps 0, 1, 2, 5 are honest; u=1 asks to skip every layer otherwise
    loop = Loop(_cfg(warmup_steps=2, honest_check_every=3, enable_gca=True), mechanism="branch")
    all_skip = torch.ones(N_LAYER)
    recs = [loop.step(all_skip, with_reference=True) for _ in range(6)]
    assert [r["plan"].honest for r in recs] == [True, True, True, False, False, True]
    assert recs[3]["plan"].skipped == (0, 1, 2, 3)
    assert recs[4]["plan"].skipped == (0, 1, 2, 3)
    for t in (2, 5):
        rec = recs[t]
        assert bool(rec["plan"].compute.all())
        assert set(rec["full"]) == set(loop.params)
        for name, g in rec["full"].items():
            assert torch.equal(g, rec["ref"][name]), (t, name)
    # and on a skipping step the layers' gradients were predictions
    for name in loop.lmap.params[2]:
        assert not torch.equal(recs[4]["full"][name], recs[4]["ref"][name])


# --------------------------------------------------------------------------- #
# Warm-up: bit-identical to plain training
# --------------------------------------------------------------------------- #


def test_warmup_is_bit_identical_to_plain_training() -> None:
    warmup = 4
    cfg = FlashConfig(warmup_steps=warmup, verbose=False)  # every component on, as a user would run it
    loop = Loop(cfg, mechanism=cfg.alas_mechanism, seed=3)

    plain = tiny_gpt2(N_LAYER, seed=3)
    init = {k: v.detach().clone() for k, v in plain.named_parameters()}
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-2)

    for t in range(warmup):
        rec = loop.step()
        assert not rec["plan"].active and rec["plan"].honest and not rec["plan"].weigh
        assert rec["decision"].n_virtual == 0
        ids = token_batch(4, seed=100 + t)
        plain_opt.zero_grad()
        logits = plain(ids).logits[:, :-1]
        n, s, c = logits.shape
        terms = nn.functional.cross_entropy(logits.reshape(n * s, c), ids[:, 1:].reshape(n * s), reduction="none")
        loss = terms.reshape(n, s).mean(dim=1).mean()
        loss.backward()
        plain_opt.step()
        assert torch.equal(rec["loss"], loss.detach())
        for name, p in plain.named_parameters():
            assert torch.equal(loop.params[name], p), (t, name)
    assert all(not torch.equal(init[k], v) for k, v in loop.params.items())
    # right after warm-up Flash Mode acts
    assert loop.plan(SKIP_1_3).active


# --------------------------------------------------------------------------- #
# flash_init_for
# --------------------------------------------------------------------------- #


def test_flash_init_for_layer_sizes() -> None:
    m = tiny_gpt2(N_LAYER)
    lmap = find_layers(m)
    params = dict(m.named_parameters())
    state = flash_init_for(m, lmap, params)
    expected = [sum(p.numel() for n, p in m.named_parameters() if n.startswith(f"transformer.h.{i}."))
                for i in range(N_LAYER)]
    assert state.layer_sizes.tolist() == expected


# --------------------------------------------------------------------------- #
# GCA helpers: snapshots, virtual steps, rollback
# --------------------------------------------------------------------------- #


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _real_step(model: nn.Module, opt: torch.optim.Optimizer, t: int) -> None:
    g = torch.Generator().manual_seed(1000 + t)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def _assert_trees_equal(a: Any, b: Any) -> None:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    assert sa == sb
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        if isinstance(x, Tensor):
            assert isinstance(y, Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert x == y


def test_checkpoint_then_rollback_restores_exactly() -> None:
    model = _mlp()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for t in range(3):
        _real_step(model, opt, t)

    at_ckpt_params = {k: v.detach().clone() for k, v in params.items()}
    at_ckpt_opt = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)  # for replay after the rollback

    snap = gca_after_step(GCADecision(True, 2, True, False), params, opt, None)
    assert snap is not None
    _assert_trees_equal(snap.params, at_ckpt_params)  # taken before the virtual steps
    assert all(not torch.equal(params[k], at_ckpt_params[k]) for k in params)  # the virtual steps moved them
    first = next(iter(opt.state.values()))
    assert int(first["step"]) == 3 + 2

    for t in range(3, 6):  # more real steps, with virtual steps in between
        _real_step(model, opt, t)
        again = gca_after_step(GCADecision(True, 1, False, False), params, opt, snap)
        assert again is snap
    assert int(first["step"]) == 5 + 3 * 2

    for _ in range(2):  # a rollback restores the checkpoint exactly, and it can be done again
        kept = gca_after_step(GCADecision(False, 0, False, True), params, opt, snap)
        assert kept is snap
        _assert_trees_equal({k: v.detach() for k, v in params.items()}, at_ckpt_params)
        _assert_trees_equal(opt.state_dict(), at_ckpt_opt)
        _real_step(model, opt, 99)  # training on after the rollback must not corrupt the snapshot
    _assert_trees_equal(snap.params, at_ckpt_params)

    # the restored optimizer is a working one: a step from it equals a step from the checkpoint
    gca_after_step(GCADecision(False, 0, False, True), params, opt, snap)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(at_ckpt_opt))
    _real_step(model, opt, 7)
    _real_step(twin, twin_opt, 7)
    for (k, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(p, q), k


def test_rollback_without_snapshot_does_nothing() -> None:
    model = _mlp()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _real_step(model, opt, 0)
    before = {k: v.detach().clone() for k, v in params.items()}
    assert gca_after_step(GCADecision(False, 0, False, True), params, opt, None) is None
    _assert_trees_equal({k: v.detach() for k, v in params.items()}, before)


def test_no_decision_leaves_everything() -> None:
    model = _mlp()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _real_step(model, opt, 0)
    before = {k: v.detach().clone() for k, v in params.items()}
    before_opt = copy.deepcopy(opt.state_dict())
    snap = take_snapshot(params, opt)
    assert gca_after_step(GCADecision(False, 0, False, False), params, opt, snap) is snap
    _assert_trees_equal({k: v.detach() for k, v in params.items()}, before)
    _assert_trees_equal(opt.state_dict(), before_opt)


def test_virtual_steps_leave_the_scheduler_alone() -> None:
    model = _mlp()
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(2):
        _real_step(model, opt, t)
        sched.step()
    epoch, lrs = sched.last_epoch, [g["lr"] for g in opt.param_groups]
    last_lr = sched.get_last_lr()
    before = {k: v.detach().clone() for k, v in params.items()}
    virtual_steps(opt, 2)
    assert sched.last_epoch == epoch == 2
    assert [g["lr"] for g in opt.param_groups] == lrs == [1e-2 * 0.25]
    assert sched.get_last_lr() == last_lr
    assert all(not torch.equal(params[k], before[k]) for k in params)
    assert int(next(iter(opt.state.values()))["step"]) == 4
    # and the same through gca_after_step
    gca_after_step(GCADecision(True, 1, False, False), params, opt, None)
    assert sched.last_epoch == epoch
    assert int(next(iter(opt.state.values()))["step"]) == 5


def test_momentum_predictor_without_an_optimizer_is_refused() -> None:
    """The default predictor reads the optimizer's first moment: finish_step without one says what to pass."""
    loop = Loop(_cfg(predictor="momentum"))
    ids = loop.batch()
    plan = loop.plan()
    grads, loss, aux = masked_value_and_grad(loop.psl, loop.params, loop.buffers, ids, lmap=loop.lmap, plan=plan,
                                             skipper=loop.skipper)
    with pytest.raises(ValueError, match="optimizer="):
        finish_step(loop.state, loop.cfg, plan, loop.lmap, loop.params, grads, loss, aux.weights)
