"""Tests for ``flashfn.core.weighting`` against the documented formula, written out here."""

from __future__ import annotations

import math
from typing import List

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flashfn.core.weighting import weigh_samples, weighted_loss, weighting_init, weighting_update

FAST = settings(max_examples=30, deadline=None)

losses_st = st.lists(
    st.one_of(st.floats(-5.0, 1e4, allow_nan=False, allow_infinity=False),
              st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0])),
    min_size=1, max_size=20)


def reference_weight(loss: float, min_weight: float, threshold: float) -> float:
    """The module docstring's formula, one sample at a time (non-finite -> 1, clamped to [min_weight, 1])."""
    if not math.isfinite(loss):
        return 1.0
    if loss >= threshold:
        return 1.0
    w = min_weight + (1.0 - min_weight) * max(loss, 0.0) / threshold
    return min(max(w, min_weight), 1.0)


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


@FAST
@given(losses_st, st.floats(0.01, 1.0), st.floats(1e-3, 1e3))
@example([0.0, 0.25, 0.5, 2.0], 0.3, 0.5)
@example([0.4999999], 0.3, 0.5)
def test_weigh_samples_is_the_documented_formula(losses: List[float], min_weight: float, threshold: float) -> None:
    x = torch.tensor(losses, dtype=torch.float64)
    w = weigh_samples(x, min_weight=min_weight, low_loss_threshold=threshold)
    assert w.dtype == torch.float32 and w.shape == x.shape
    want = torch.tensor([reference_weight(v, min_weight, threshold) for v in losses], dtype=torch.float64)
    torch.testing.assert_close(w.double(), want, rtol=1e-6, atol=1e-6)
    assert bool((w >= f32(min_weight)).all()) and bool((w <= 1.0).all())  # in the state's float32


def test_weigh_samples_examples() -> None:
    w = weigh_samples(torch.tensor([0.0, 0.25, 0.5, 0.75, -1.0]), min_weight=0.3, low_loss_threshold=0.5)
    torch.testing.assert_close(w, torch.tensor([0.3, 0.65, 1.0, 1.0, 0.3]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_losses_get_weight_one(bad: float) -> None:
    w = weigh_samples(torch.tensor([0.1, bad, 0.0]), min_weight=0.5, low_loss_threshold=1.0)
    assert float(w[1]) == 1.0
    assert bool(torch.isfinite(w).all())
    torch.testing.assert_close(w[[0, 2]], torch.tensor([0.55, 0.5]))


def test_weigh_samples_keeps_shape_and_has_no_gradient() -> None:
    losses = torch.rand(3, 4, requires_grad=True)
    w = weigh_samples(losses)
    assert w.shape == (3, 4) and not w.requires_grad


@pytest.mark.parametrize("kwargs", [dict(min_weight=0.0), dict(min_weight=1.5), dict(min_weight=-0.1),
                                    dict(low_loss_threshold=0.0), dict(low_loss_threshold=-1.0),
                                    dict(min_weight=float("nan")), dict(low_loss_threshold=float("nan"))])
def test_weigh_samples_rejects_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        weigh_samples(torch.ones(3), **kwargs)


def test_weigh_samples_is_vmap_safe() -> None:
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(4, 6, generator=g)
    batched = torch.func.vmap(lambda x: weigh_samples(x, min_weight=0.2, low_loss_threshold=0.6))(losses)
    looped = torch.stack([weigh_samples(row, min_weight=0.2, low_loss_threshold=0.6) for row in losses])
    assert torch.equal(batched, looped)


# --------------------------------------------------------------------------- #
# weighted_loss
# --------------------------------------------------------------------------- #


@FAST
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=32))
def test_unit_weights_give_the_plain_mean(values: List[float]) -> None:
    losses = torch.tensor(values, dtype=torch.float64)
    out = weighted_loss(losses, torch.ones_like(losses))
    torch.testing.assert_close(out, losses.mean(), rtol=1e-12, atol=1e-12)


def test_unit_weights_give_the_plain_mean_and_gradient_float32() -> None:
    losses = torch.rand(7, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = weighted_loss(losses, torch.ones(7))
    torch.testing.assert_close(out, losses.mean())
    (g,) = torch.autograd.grad(out, losses)
    torch.testing.assert_close(g, torch.full((7,), 1 / 7))


@FAST
@given(st.lists(st.tuples(st.floats(0.0, 10.0), st.floats(0.0, 1.0)), min_size=1, max_size=16),
       st.one_of(st.none(), st.floats(0.5, 100.0)), st.booleans())
def test_weighted_loss_honours_the_normaliser(pairs, normaliser, as_tensor) -> None:
    losses = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    weights = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    n = len(pairs) if normaliser is None else normaliser
    want = sum(lo * float(torch.tensor(w, dtype=torch.float32)) for lo, w in pairs) / n
    arg = None if normaliser is None else (torch.tensor(normaliser, dtype=torch.float64) if as_tensor else normaliser)
    out = weighted_loss(losses, weights, arg)
    assert out.dtype == torch.float64
    assert float(out) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_weighted_loss_gradient_flows_through_losses_only() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    weights = torch.tensor([0.5, 1.0, 0.25], requires_grad=True)
    out = weighted_loss(losses, weights, normaliser=4.0)
    assert float(out.detach()) == pytest.approx((0.5 + 2.0 + 0.75) / 4)
    out.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.5, 1.0, 0.25]) / 4)
    assert weights.grad is None


# --------------------------------------------------------------------------- #
# statistics
# --------------------------------------------------------------------------- #


def test_weighting_init_is_empty() -> None:
    s = weighting_init()
    assert int(s.count) == 0 and float(s.weight_sum) == 0.0 and int(s.low_count) == 0
    assert (s.count.dtype, s.weight_sum.dtype, s.low_count.dtype) == (torch.int64, torch.float64, torch.int64)


@FAST
@given(st.lists(st.lists(st.one_of(st.floats(0.0, 1.0), st.sampled_from([float("nan"), float("inf"), 1.0])),
                         min_size=0, max_size=8), min_size=1, max_size=5))
def test_weighting_update_counts_finite_weights_only(batches: List[List[float]]) -> None:
    s = weighting_init()
    count, total, low = 0, 0.0, 0
    for batch in batches:
        w = torch.tensor(batch, dtype=torch.float32)
        s = weighting_update(s, w)
        for v in batch:
            if math.isfinite(v):
                count += 1
                total += f32(v)
                low += f32(v) < 1.0
    assert int(s.count) == count
    assert float(s.weight_sum) == pytest.approx(total, rel=1e-12, abs=1e-12)
    assert int(s.low_count) == low
    assert math.isfinite(float(s.weight_sum))
