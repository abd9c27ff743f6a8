"""Tests for ``flashfn.core.alas`` against plain references written here."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flashfn.core.alas import (
    ALASState,
    alas_init,
    alas_update,
    interpolate,
    layer_heat,
    reset_activity,
    should_backward,
    state_nbytes,
)

FAST = settings(max_examples=30, deadline=None)
SHAPES = (((3, 2), (2,)), ((5,),))


def make_params(seed: int = 0, shapes=SHAPES) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randn(s, generator=g) for s in layer) for layer in shapes)


def rand_grads(seed: int, shapes=SHAPES, scale: float = 1.0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(tuple(scale * torch.randn(s, generator=g) for s in layer) for layer in shapes)


def flat64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def cosine64(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))


def reference_prediction(history: List[torch.Tensor], interp_decay: float, trend_weight: float) -> torch.Tensor:
    """avg (weights interp_decay**age, normalised) + trend_weight * (last - prev); a plain float64 loop."""
    n = len(history)
    num = torch.zeros_like(history[0])
    den = 0.0
    for k, g in enumerate(history):
        w = interp_decay ** (n - 1 - k)
        num = num + w * g
        den += w
    avg = num / den
    if n >= 2:
        return avg + trend_weight * (history[-1] - history[-2])
    return avg


def f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def state_is_finite(state: ALASState) -> bool:
    """Every tensor finite, except ``fidelity`` before a layer's second real gradient (NaN by design)."""
    tensors = [state.heat, state.stability, state.activity, state.avg_weight]
    tensors += [t for layer in state.avg + state.last + state.prev for t in layer]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return False
    measured = state.observed >= 2
    return bool(torch.isfinite(state.fidelity[measured]).all())


# --------------------------------------------------------------------------- #
# init, layer_heat, state_nbytes
# --------------------------------------------------------------------------- #


def test_init_starts_fully_active_with_empty_history() -> None:
    params = make_params()
    s = alas_init(params)
    assert s.activity.tolist() == [1.0, 1.0]
    assert s.observed.tolist() == [0, 0] and s.skip_streak.tolist() == [0, 0]
    assert int(s.step) == 0
    assert bool(torch.isnan(s.fidelity).all())
    for hist in (s.avg, s.last, s.prev):  # one flat vector per layer, the layer's parameters in order
        for flat, plist in zip(hist, params):
            assert flat.shape == (sum(p.numel() for p in plist),) and flat.dtype == plist[0].dtype
            assert bool((flat == 0).all())
    s64 = alas_init(params, history_dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in s64.avg + s64.last + s64.prev)


def test_layer_heat_is_rms_grad_over_rms_weight() -> None:
    params = make_params(1)[0]
    grads = rand_grads(2)[0]
    rms_g = flat64(grads).pow(2).mean().sqrt()
    rms_w = flat64(params).pow(2).mean().sqrt()
    h = layer_heat(grads, params)
    assert h.dtype == torch.float32 and h.shape == ()
    assert float(h) == pytest.approx(float(rms_g / rms_w), rel=1e-5)


def test_state_nbytes_grows_with_the_history_dtype() -> None:
    params = make_params()
    n_params = sum(p.numel() for layer in params for p in layer)
    s32 = alas_init(params)
    s64 = alas_init(params, history_dtype=torch.float64)
    # avg, last and prev each hold one copy of the parameters: 4 more bytes per value in float64
    assert state_nbytes(s64) - state_nbytes(s32) == 3 * n_params * 4
    assert state_nbytes(s32) >= 3 * n_params * 4


# --------------------------------------------------------------------------- #
# should_backward
# --------------------------------------------------------------------------- #


@st.composite
def trained_states(draw, max_layers: int = 4):
    """A state after a random sequence of updates in which layers are skipped at random."""
    n_layers = draw(st.integers(1, max_layers))
    shapes = tuple(((draw(st.integers(1, 4)),),) for _ in range(n_layers))
    params = make_params(draw(st.integers(0, 10)), shapes)
    s = alas_init(params)
    n_steps = draw(st.integers(0, 8))
    for t in range(n_steps):
        present = draw(st.lists(st.booleans(), min_size=n_layers, max_size=n_layers))
        grads = rand_grads(100 + t, shapes)
        s = alas_update(s, tuple(g if p else None for g, p in zip(grads, present)), params,
                        min_activity=draw(st.sampled_from([0.1, 0.3, 0.9])))
    return s


@FAST
@given(trained_states(), st.integers(0, 2**31))
def test_should_backward_honest_is_all_true(state: ALASState, seed: int) -> None:
    mask = should_backward(state, honest=True, seed=seed, u=torch.ones(state.activity.numel()))
    assert mask.dtype == torch.bool and bool(mask.all())


@FAST
@given(trained_states(), st.data(), st.integers(1, 4))
def test_should_backward_with_u_is_u_below_activity_except_forced(state: ALASState, data, mcs: int) -> None:
    n = state.activity.numel()
    u_list = data.draw(st.lists(st.floats(0.0, 1.0, exclude_max=True, width=32), min_size=n, max_size=n))
    u = torch.tensor(u_list, dtype=torch.float64)
    mask = should_backward(state, u=u, max_consecutive_skips=mcs)
    for i in range(n):
        forced = int(state.observed[i]) == 0 or int(state.skip_streak[i]) >= mcs
        expected = forced or u_list[i] < float(state.activity[i])
        assert bool(mask[i]) == expected, (i, u_list[i], float(state.activity[i]), forced)


def _observed_once(n: int = 2) -> ALASState:
    params = make_params(shapes=tuple(((2,),) for _ in range(n)))
    return alas_update(alas_init(params), rand_grads(0, tuple(((2,),) for _ in range(n))), params)


def test_should_backward_full_activity_never_skips_float64_draws() -> None:
    """Activity 1 means an honest backward with probability 1, whatever u in [0, 1) is drawn (float64 draws)."""
    s = _observed_once(3)
    assert s.activity.tolist() == [1.0, 1.0, 1.0] and s.observed.tolist() == [1, 1, 1]
    u = torch.tensor([0.5, 1.0 - 1e-9, math.nextafter(1.0, 0.0)], dtype=torch.float64)
    assert should_backward(s, u=u).tolist() == [True, True, True]


def test_should_backward_u_compared_in_full_precision() -> None:
    s = _observed_once(1)
    s = s._replace(activity=torch.tensor([0.3], dtype=torch.float32))
    a = float(s.activity[0])  # 0.30000001192...
    below = torch.tensor([math.nextafter(a, 0.0)], dtype=torch.float64)  # strictly below the activity
    assert should_backward(s, u=below).tolist() == [True]
    assert should_backward(s, u=torch.tensor([a], dtype=torch.float64)).tolist() == [False]


def test_should_backward_draws_are_seeded_and_follow_activity() -> None:
    n = 64
    s = _observed_once(n)._replace(activity=torch.full((n,), 0.4))
    masks = [should_backward(s._replace(step=torch.tensor(t)), seed=7) for t in range(1, 65)]
    again = [should_backward(s._replace(step=torch.tensor(t)), seed=7) for t in range(1, 65)]
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
    frac = float(torch.stack(masks).float().mean())
    assert 0.35 < frac < 0.45  # 4096 draws with p = 0.4
    other_seed = should_backward(s._replace(step=torch.tensor(1)), seed=8)
    assert not torch.equal(masks[0], other_seed)
    assert not torch.equal(masks[0], masks[1])  # the draws depend on the step


def test_should_backward_forces_after_max_consecutive_skips() -> None:
    params = make_params()
    s = alas_update(alas_init(params), rand_grads(0), params)
    never = torch.ones(2, dtype=torch.float64)  # u = 1 is never below an activity <= 1
    for k in range(1, 4):
        assert should_backward(s, u=never, max_consecutive_skips=3).tolist() == [False, False]
        s = alas_update(s, (None, None), params)
        assert s.skip_streak.tolist() == [k, k]
    assert should_backward(s, u=never, max_consecutive_skips=3).tolist() == [True, True]
    s = alas_update(s, (rand_grads(1)[0], None), params)
    assert s.skip_streak.tolist() == [0, 4]


# --------------------------------------------------------------------------- #
# alas_update: fidelity, activity, non-finite gradients
# --------------------------------------------------------------------------- #


@FAST
@given(st.floats(0.0, 0.99), st.floats(0.0, 1.0), st.integers(0, 1000), st.booleans())
def test_fidelity_is_cosine_of_prediction_and_real_gradient(interp_decay, trend_weight, seed, f64) -> None:
    params = make_params(seed)
    s = alas_init(params, history_dtype=torch.float64 if f64 else None)
    history: List[List[torch.Tensor]] = [[], []]
    g = torch.Generator().manual_seed(seed)
    base = rand_grads(seed + 1)
    for t in range(6):
        # correlated gradients so that the cosine is far from 0
        grads = tuple(tuple(b + 0.5 * torch.randn(b.shape, generator=g) for b in layer) for layer in base)
        present = [True, t % 3 != 1]
        step_grads = tuple(gr if p else None for gr, p in zip(grads, present))
        new = alas_update(s, step_grads, params, interp_decay=interp_decay, trend_weight=trend_weight)
        for i in range(2):
            if not present[i]:
                assert same(new.fidelity[i], s.fidelity[i])
                continue
            real = flat64(grads[i])
            if history[i]:
                pred = reference_prediction(history[i], interp_decay, trend_weight)
                assert float(new.fidelity[i]) == pytest.approx(cosine64(pred, real), abs=2e-5)
            else:
                assert math.isnan(float(new.fidelity[i]))
            history[i].append(real)
        s = new


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())


@st.composite
def gradient_sequences(draw):
    n_layers = draw(st.integers(1, 3))
    n_steps = draw(st.integers(1, 12))
    kinds = draw(st.lists(st.lists(st.sampled_from(["real", "real", "skip", "nan", "inf", "scaled"]),
                                   min_size=n_layers, max_size=n_layers), min_size=n_steps, max_size=n_steps))
    return n_layers, kinds, draw(st.integers(0, 10_000))


def _make_step(kinds: List[str], shapes, seed: int, base) -> tuple:
    g = torch.Generator().manual_seed(seed)
    out: List[Optional[tuple]] = []
    for kind, layer, b in zip(kinds, shapes, base):
        if kind == "skip":
            out.append(None)
            continue
        grads = [bb + 0.3 * torch.randn(s, generator=g) for bb, s in zip(b, layer)]
        if kind == "scaled":
            grads = [100.0 * x for x in grads]
        elif kind in ("nan", "inf"):
            grads[-1] = grads[-1].clone()
            grads[-1].view(-1)[0] = float("nan") if kind == "nan" else float("-inf")
        out.append(tuple(grads))
    return tuple(out)


@FAST
@given(gradient_sequences(), st.floats(0.01, 1.0), st.floats(0.0, 0.999))
@example((2, [["real", "real"]] * 12, 0), 0.3, 0.0)
@example((1, [["real"]] * 12, 1), 1.0, 0.5)
def test_activity_stays_in_range_and_state_finite(seq, min_activity: float, decay: float) -> None:
    n_layers, kinds, seed = seq
    shapes = SHAPES[:1] * n_layers
    params = make_params(seed, shapes)
    base = rand_grads(seed + 1, shapes)
    s = alas_init(params)
    observed = [0] * n_layers
    for t, step_kinds in enumerate(kinds):
        s = alas_update(s, _make_step(step_kinds, shapes, seed + 10 * t, base), params,
                        min_activity=min_activity, activity_decay=decay)
        lo = f32(min_activity)  # the state is float32
        assert bool((s.activity >= lo).all()) and bool((s.activity <= 1.0).all()), (s.activity, min_activity)
        assert bool(((s.stability >= 0) & (s.stability <= 1)).all())
        assert bool((s.heat >= 0).all())
        assert state_is_finite(s)
        for i, k in enumerate(step_kinds):
            observed[i] += k in ("real", "scaled")
        assert s.observed.tolist() == observed
    assert int(s.step) == len(kinds)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_gradient_never_enters_the_state(bad: float) -> None:
    params = make_params()
    s = alas_init(params)
    for t in range(3):
        s = alas_update(s, rand_grads(t), params)
    grads = rand_grads(10)
    poisoned = (tuple(g.clone() for g in grads[0]), grads[1])
    poisoned[0][1][0] = bad
    new = alas_update(s, poisoned, params)
    assert state_is_finite(new)
    assert new.observed.tolist() == [3, 4]  # layer 0 counted as not observed
    assert new.skip_streak.tolist() == [1, 0]
    for hist_old, hist_new in ((s.avg, new.avg), (s.last, new.last), (s.prev, new.prev)):
        assert all(torch.equal(a, b) for a, b in zip(hist_old[0], hist_new[0]))
    for name in ("heat", "stability", "fidelity", "avg_weight"):
        assert same(getattr(new, name)[0], getattr(s, name)[0]), name
    # the next prediction for that layer is still built from finite gradients only
    pred = interpolate(new, [0], noise_scale=0.0)[0]
    assert all(bool(torch.isfinite(p).all()) for p in pred)


def test_nonfinite_gradient_on_a_fresh_layer_keeps_it_unobserved() -> None:
    params = make_params()
    s = alas_init(params)
    grads = rand_grads(0)
    bad = (tuple(torch.full_like(g, float("nan")) for g in grads[0]), grads[1])
    s = alas_update(s, bad, params)
    assert s.observed.tolist() == [0, 1]
    assert state_is_finite(s)
    assert should_backward(s, u=torch.ones(2)).tolist() == [True, False]  # no history yet: forced
    with pytest.raises(ValueError):
        interpolate(s, [0])


def test_alas_update_rejects_a_wrong_number_of_layers() -> None:
    params = make_params()
    with pytest.raises(ValueError):
        alas_update(alas_init(params), rand_grads(0)[:1], params[:1])


def test_predictable_cold_layers_go_down_hot_or_unpredictable_ones_stay_up() -> None:
    shapes = (((200,),),) * 3
    params = make_params(0, shapes)
    g = torch.Generator().manual_seed(3)
    const = rand_grads(1, shapes)
    s = alas_init(params)
    for _ in range(150):
        noisy = tuple(torch.randn(x.shape, generator=g) for x in const[2])
        # layer 0: constant (predictable), layer 1: the same but 10x hotter, layer 2: pure noise
        grads = (const[0], tuple(10 * x for x in const[1]), noisy)
        s = alas_update(s, grads, params, min_activity=0.3, activity_decay=0.9)
    a = s.activity.tolist()
    assert a[0] < 0.35  # predictable and no hotter than average: down to about min_activity
    assert a[1] > a[0] + 0.2  # hot: stays higher
    assert a[2] > 0.85  # unpredictable: stays near 1
    assert float(s.fidelity[0]) == pytest.approx(1.0, abs=1e-5)


def test_reset_activity() -> None:
    params = make_params()
    s = alas_init(params)
    for _ in range(30):
        s = alas_update(s, rand_grads(0), params, activity_decay=0.5)
    s = alas_update(s, (None, rand_grads(0)[1]), params)
    assert bool((s.activity < 1).all()) and bool((s.stability > 0).all()) and int(s.skip_streak[0]) == 1
    r = reset_activity(s)
    assert r.activity.tolist() == [1.0, 1.0]
    assert r.stability.tolist() == [0.0, 0.0]
    assert r.skip_streak.tolist() == [0, 0]
    for name in ("step", "heat", "observed", "avg_weight", "fidelity"):
        assert same(getattr(r, name), getattr(s, name))
    for a, b in zip(r.avg + r.last + r.prev, s.avg + s.last + s.prev):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- #
# interpolate
# --------------------------------------------------------------------------- #


@FAST
@given(st.integers(1, 6), st.floats(0.0, 0.99), st.floats(0.0, 1.0), st.integers(0, 1000), st.booleans())
def test_interpolate_without_noise_is_decayed_average_plus_trend(n_obs, interp_decay, trend_weight, seed, f64):
    params = make_params(seed)
    s = alas_init(params, history_dtype=torch.float64 if f64 else None)
    history: List[List[torch.Tensor]] = [[], []]
    for t in range(n_obs):
        grads = rand_grads(seed * 7 + t)
        s = alas_update(s, grads, params, interp_decay=interp_decay, trend_weight=trend_weight)
        for i in range(2):
            history[i].append(flat64(grads[i]))
    out = interpolate(s, [1, 0], trend_weight=trend_weight, noise_scale=0.0)
    assert len(out) == 2
    for got, i in zip(out, [1, 0]):
        assert [(x.shape, x.dtype) for x in got] == [(x.shape, x.dtype) for x in s.avg[i]]
        want = reference_prediction(history[i], interp_decay, trend_weight)
        tol = 1e-10 if f64 else 2e-6
        torch.testing.assert_close(flat64(got), want, rtol=tol, atol=tol)


def _history(n_obs: int, seed: int = 0, shapes=SHAPES) -> ALASState:
    params = make_params(seed, shapes)
    s = alas_init(params)
    for t in range(n_obs):
        s = alas_update(s, rand_grads(seed + t + 1, shapes), params)
    return s


def test_interpolate_noise_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    s = _history(3)
    a = interpolate(s, [0, 1], noise_scale=0.05, seed=1)
    b = interpolate(s, [0, 1], noise_scale=0.05, seed=1)
    c = interpolate(s, [0, 1], noise_scale=0.05, seed=2)
    clean = interpolate(s, [0, 1], noise_scale=0.0)
    for la, lb, lc, l0 in zip(a, b, c, clean):
        for x, y, z, w in zip(la, lb, lc, l0):
            assert torch.equal(x, y)
            assert not torch.equal(x, z)
            assert not torch.equal(x, w)
    # the noise also changes with the step (a fresh draw on every step)
    later = interpolate(s._replace(step=s.step + 1), [0, 1], noise_scale=0.05, seed=1)
    assert not torch.equal(later[0][0], a[0][0])


def test_interpolate_noise_has_the_documented_scale() -> None:
    shapes = (((20_000,),),)
    s = _history(3, 0, shapes)
    clean = interpolate(s, [0], noise_scale=0.0)[0].double()
    noisy = interpolate(s, [0], noise_scale=0.1, seed=4)[0].double()
    noise = noisy - clean
    expected_std = 0.1 * float(clean.abs().mean())
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.05 * expected_std)
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.05)


def test_interpolate_raises_for_a_layer_without_history() -> None:
    params = make_params()
    s = alas_update(alas_init(params), (rand_grads(0)[0], None), params)
    assert len(interpolate(s, [0])) == 1
    with pytest.raises(ValueError, match="1"):
        interpolate(s, [1])
    with pytest.raises(ValueError):
        interpolate(alas_init(params), [0])


@pytest.mark.parametrize("n_obs", [1, 3])
@pytest.mark.parametrize("noise_scale", [0.0, 0.05])
def test_interpolate_returns_fresh_tensors(n_obs: int, noise_scale: float) -> None:
    """A prediction is handed to the caller as a gradient (clipped, zeroed in place): it must not be the state."""
    s = _history(n_obs)
    kept = [[x.clone() for x in layer] for layer in s.avg + s.last + s.prev]
    preds = interpolate(s, [0, 1], noise_scale=noise_scale)
    for layer in preds:
        for x in layer:
            x.mul_(0.5)  # what clip_grad_norm_ does
    assert all(torch.equal(a, b) for la, lb in zip(kept, s.avg + s.last + s.prev) for a, b in zip(la, lb))
