"""Tests for ``flashfn.core.gca`` against a plain float64 reference written here."""

from __future__ import annotations

import math
from typing import Optional

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashfn.core.gca import GCADecision, GCAState, gca_init, gca_reset, gca_update

FAST = settings(max_examples=30, deadline=None)
NOTHING = GCADecision(False, 0, False, False)


def flat64(tree) -> torch.Tensor:
    return torch.cat([x.detach().double().flatten() for x in optree.tree_leaves(tree)])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        a.nan_to_num(), b.nan_to_num())


def tree_same(a, b) -> bool:
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    return sa == sb and all(same(x, y) for x, y in zip(la, lb))


def expected_n(c: float, t: float, max_virtual: int) -> int:
    """The module docstring's rule: one step just above the threshold, the maximum only near 1."""
    if c < t or max_virtual == 0:
        return 0
    return min(max_virtual, 1 + math.floor((c - t) / (1 - t) * max_virtual))


class Reference:
    """Plain float64 bookkeeping of direction, anchor, smoothed loss and checkpoints (until a rollback)."""

    def __init__(self, dim: int, every: int, smoothing: float, rollback_threshold: float) -> None:
        self.direction = torch.zeros(dim, dtype=torch.float64)
        self.anchor: Optional[torch.Tensor] = None
        self.loss_ema: Optional[float] = None
        self.ckpt_loss: Optional[float] = None
        self.virtual_since = 0
        self.step = 0
        self.every, self.s, self.rb = every, smoothing, rollback_threshold

    def update(self, g: torch.Tensor, loss: float):
        """Returns (coherence, checkpoint, rollback, had_anchor)."""
        self.step += 1
        self.direction = self.s * self.direction + (1 - self.s) * g
        self.loss_ema = loss if self.loss_ema is None else self.s * self.loss_ema + (1 - self.s) * loss
        rollback = self.virtual_since > 0 and self.ckpt_loss is not None and self.loss_ema > self.rb * self.ckpt_loss
        had_anchor = self.anchor is not None
        if had_anchor:
            d, a = self.direction, self.anchor
            denom = math.sqrt(float(d @ d) * float(a @ a))
            coherence = float(d @ a) / denom if denom > 0 else 0.0
        else:
            coherence = 0.0
        checkpoint = self.step % self.every == 0
        if checkpoint and not rollback:
            self.anchor = self.direction.clone()
            self.ckpt_loss = self.loss_ema
            self.virtual_since = 0
        return coherence, checkpoint, rollback, had_anchor


def grad_tree(vec: torch.Tensor) -> dict:
    return {"w": vec[:6].reshape(2, 3).float(), "b": vec[6:].float()}


# --------------------------------------------------------------------------- #
# The main property: coherence, checkpoints, virtual steps and rollbacks
# --------------------------------------------------------------------------- #


@FAST
@given(
    seed=st.integers(0, 10_000),
    noise=st.floats(0.0, 2.0),
    threshold=st.floats(-1.0, 0.99),
    max_virtual=st.integers(0, 3),
    every=st.integers(1, 5),
    smoothing=st.floats(0.0, 0.95),
    rollback_threshold=st.floats(1.0, 1.3),
    allow_virtual=st.booleans(),
    n_steps=st.integers(1, 16),
)
def test_gca_update_follows_the_reference(seed, noise, threshold, max_virtual, every, smoothing,
                                          rollback_threshold, allow_virtual, n_steps) -> None:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(9, generator=g, dtype=torch.float64)
    ref = Reference(9, every, smoothing, rollback_threshold)
    state = gca_init(grad_tree(torch.zeros(9)))
    virtual_total = 0
    for _ in range(n_steps):
        vec = (base + noise * torch.randn(9, generator=g, dtype=torch.float64)).float().double()
        loss = float(0.5 + torch.rand((), generator=g, dtype=torch.float64))
        state, dec = gca_update(state, grad_tree(vec), loss, coherence_threshold=threshold,
                                max_virtual_steps=max_virtual, checkpoint_every=every, smoothing=smoothing,
                                rollback_threshold=rollback_threshold, allow_virtual=allow_virtual)
        coherence, checkpoint, rollback, had_anchor = ref.update(vec, loss)
        assert float(state.loss_ema) == pytest.approx(ref.loss_ema, rel=1e-12) or rollback
        assert dec.rollback == rollback
        if rollback:
            assert (dec.take, dec.n_virtual, dec.checkpoint) == (False, 0, False)
            assert int(state.rollbacks) == 1
            break
        c = float(state.coherence)
        assert c == pytest.approx(coherence, abs=1e-5)
        assert dec.checkpoint == checkpoint
        # virtual steps: in range, 0 under the threshold, only when allowed, the documented count
        assert 0 <= dec.n_virtual <= max_virtual
        assert dec.take == (dec.n_virtual > 0)
        if c < threshold or not allow_virtual or not had_anchor:
            assert dec.n_virtual == 0
        else:
            assert dec.n_virtual == expected_n(c, threshold, max_virtual)
        ref.virtual_since += dec.n_virtual
        virtual_total += dec.n_virtual
        assert int(state.virtual_total) == virtual_total
        assert int(state.virtual_since_ckpt) == ref.virtual_since
        assert int(state.checkpoints) == ref.step // every
    assert int(state.rollbacks) in (0, 1)


def test_coherence_uses_the_anchor_of_the_last_checkpoint() -> None:
    a = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    s = gca_init(grad_tree(torch.zeros(9)))
    s, d = gca_update(s, grad_tree(a), 1.0, smoothing=0.0, checkpoint_every=2)
    assert float(s.coherence) == 0.0 and not d.checkpoint and not bool(s.has_anchor)
    s, d = gca_update(s, grad_tree(a), 1.0, smoothing=0.0, checkpoint_every=2)
    assert d.checkpoint and bool(s.has_anchor)  # anchor = a
    s, _ = gca_update(s, grad_tree(b), 1.0, smoothing=0.0, checkpoint_every=2)
    assert float(s.coherence) == pytest.approx(0.0, abs=1e-12)  # b against the anchor a
    s, d = gca_update(s, grad_tree(a + b), 1.0, smoothing=0.0, checkpoint_every=2)
    assert d.checkpoint
    assert float(s.coherence) == pytest.approx(1 / math.sqrt(2), abs=1e-7)  # measured before the new anchor
    s, _ = gca_update(s, grad_tree(b), 1.0, smoothing=0.0, checkpoint_every=2)
    assert float(s.coherence) == pytest.approx(1 / math.sqrt(2), abs=1e-7)  # b against the anchor a + b


@pytest.mark.parametrize("every", [1, 3, 5])
def test_checkpoints_every_n_updates(every: int) -> None:
    s = gca_init(torch.zeros(4))
    flags = []
    for _ in range(16):
        s, d = gca_update(s, torch.ones(4), 1.0, checkpoint_every=every)
        flags.append(d.checkpoint)
    assert flags == [(t + 1) % every == 0 for t in range(16)]
    assert int(s.checkpoints) == 16 // every


# --------------------------------------------------------------------------- #
# Rollbacks
# --------------------------------------------------------------------------- #

KW = dict(coherence_threshold=0.9, max_virtual_steps=2, checkpoint_every=3, smoothing=0.5, rollback_threshold=1.1)


def test_rollback_after_virtual_steps_and_a_loss_rise_then_no_virtual_until_next_checkpoint() -> None:
    s = gca_init(torch.zeros(3))
    g = torch.tensor([1.0, 2.0, -1.0])
    decisions = {}
    losses = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0, 7: 2.0, 8: 1.0, 9: 1.0, 10: 1.0, 11: 1.0, 12: 1.0}
    for t in range(1, 13):
        s, decisions[t] = gca_update(s, g, losses[t], **KW)
        if t == 7:
            after_rollback = s
    assert [decisions[t].n_virtual for t in (1, 2, 3)] == [0, 0, 0]  # no anchor before the first checkpoint
    assert [decisions[t].n_virtual for t in (4, 5, 6)] == [2, 2, 2]  # coherence 1: the maximum
    ema7 = 0.5 * 1.0 + 0.5 * 2.0  # 1.5 > 1.1 * 1.0
    assert ema7 > 1.1 * 1.0
    assert decisions[7] == GCADecision(False, 0, False, True)
    assert int(after_rollback.rollbacks) == 1 and int(after_rollback.virtual_since_ckpt) == 0
    assert [decisions[t].n_virtual for t in (8, 9)] == [0, 0]  # none until the next checkpoint (9)
    assert decisions[9].checkpoint
    assert decisions[10].n_virtual == 2 and not decisions[10].rollback  # then again
    assert sum(d.rollback for d in decisions.values()) == 1
    assert int(s.virtual_total) == sum(d.n_virtual for d in decisions.values())


def test_no_rollback_without_virtual_steps() -> None:
    s = gca_init(torch.zeros(3))
    for t in range(1, 30):
        loss = 1.0 if t < 6 else 10.0 * t
        s, d = gca_update(s, torch.ones(3), loss, **KW, allow_virtual=False)
        assert not d.rollback and d.n_virtual == 0
    assert int(s.rollbacks) == 0


def test_no_rollback_when_the_rise_stays_under_the_threshold() -> None:
    s = gca_init(torch.zeros(3))
    for t in range(1, 30):
        loss = 1.0 if t < 6 else 1.09  # smoothed loss stays under 1.1 x the checkpoint's
        s, d = gca_update(s, torch.ones(3), loss, **KW)
        assert not d.rollback
    assert int(s.virtual_total) > 0 and int(s.rollbacks) == 0


# --------------------------------------------------------------------------- #
# Non-finite inputs, reset, loss kinds
# --------------------------------------------------------------------------- #


def _warm_state() -> GCAState:
    s = gca_init({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    for t in range(7):
        s, _ = gca_update(s, {"w": torch.ones(2, 3) + 0.1 * t, "b": torch.full((3,), -1.0)}, 1.0 + 0.01 * t,
                          checkpoint_every=3, coherence_threshold=0.5)
    assert int(s.virtual_since_ckpt) > 0
    return s


@pytest.mark.parametrize("what", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_nonfinite_input_changes_only_the_step_counter(what: str) -> None:
    s = _warm_state()
    grad = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    loss = 100.0  # would ask for a rollback if it were taken into account
    if what.endswith("loss"):
        loss = float("nan") if what.startswith("nan") else float("inf")
    else:
        grad["w"][1, 2] = float("nan") if what.startswith("nan") else float("-inf")
    new, d = gca_update(s, grad, loss, checkpoint_every=1, coherence_threshold=0.5)  # would be a checkpoint
    assert d == NOTHING
    assert int(new.step) == int(s.step) + 1
    assert tree_same(new._replace(step=s.step), s)


def test_gca_reset_forgets_direction_and_anchor_but_keeps_counters() -> None:
    s = _warm_state()
    r = gca_reset(s)
    assert all(bool((x == 0).all()) for x in optree.tree_leaves((r.direction, r.anchor)))
    assert optree.tree_structure(r.direction) == optree.tree_structure(s.direction)
    assert not bool(r.has_anchor) and float(r.coherence) == 0.0 and int(r.virtual_since_ckpt) == 0
    for name in ("step", "virtual_total", "rollbacks", "checkpoints", "loss_ema", "ckpt_loss"):
        assert same(getattr(r, name), getattr(s, name)), name
    # no virtual step before a new anchor exists
    r2, d = gca_update(r, {"w": torch.ones(2, 3), "b": torch.full((3,), -1.0)}, 1.0, checkpoint_every=3,
                       coherence_threshold=-1.0)
    assert d.n_virtual == 0


def test_gca_init_matches_the_gradient() -> None:
    like = {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)}
    s = gca_init(like)
    # one flat float32 vector of every leaf
    assert s.direction.shape == (9,) and s.direction.dtype == torch.float32
    assert s.anchor.shape == (9,) and bool((s.direction == 0).all())
    assert int(s.step) == 0 and not bool(s.has_anchor) and bool(torch.isnan(s.loss_ema))


@pytest.mark.parametrize("kind", ["float", "f32_0d", "f64_0d", "f32_1elem"])
def test_loss_kinds_keep_the_state_stable_and_unaliased(kind: str) -> None:
    def make(v: float):
        return {"float": lambda: v, "f32_0d": lambda: torch.tensor(v), "f64_0d": lambda: torch.tensor(v).double(),
                "f32_1elem": lambda: torch.tensor([v])}[kind]()

    s = gca_init(torch.zeros(3))
    meta = [(x.dtype, x.shape) for x in optree.tree_leaves(s)]
    for t in range(6):
        loss = make(1.0 + t)
        s, _ = gca_update(s, torch.ones(3), loss, checkpoint_every=2)
        assert [(x.dtype, x.shape) for x in optree.tree_leaves(s)] == meta
        kept = optree.tree_map(torch.clone, s)
        if isinstance(loss, torch.Tensor):
            loss.add_(100.0)  # the caller reuses its loss buffer
        assert tree_same(s, kept), "the state aliases the loss tensor"
