"""ALAS (Adaptive Layer Activity Spectrum): pure functions over ``ALASState``.

A *layer* is a group of parameters (for a transformer, one residual block).
Gradients and parameters enter as ``LayerTree``: a tuple over layers of tuples
of tensors, ``grads[l][k]`` being the ``k``-th parameter tensor of layer ``l``.
A layer whose gradient was not computed on a step is passed as ``None``.

Per layer the state keeps

- ``heat``: ``rms(g) / rms(w)`` of its real gradients, smoothed with
  ``activity_decay`` (how much the layer is moving);
- ``stability``: how predictable its gradient is, *measured*: each time the
  layer computes a real gradient, the cosine between what :func:`interpolate`
  would have predicted (without noise) and the real gradient is recorded in
  ``fidelity``; ``stability`` is that cosine clamped to ``[0, 1]`` and smoothed;
- ``activity``: the probability of an honest backward, in
  ``[min_activity, 1]``. Its target is
  ``1 - (1 - min_activity) * stability * cold`` where
  ``cold = min(1, mean_heat / heat)``: a layer whose gradient is both well
  predicted and no hotter than the average may go down to ``min_activity``;
  a hot or unpredictable one stays near 1. The target is smoothed with
  ``activity_decay``;
- a gradient history for :func:`interpolate`: the exponentially decayed,
  normalised average of its past real gradients and the last two of them.

Reference: the Flash Mode specification (``transformers.flash_mode`` v1.1.3);
the skipping itself follows DropBP (Woo et al., 2024, arXiv 2402.17812).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import optree
import torch

from ._util import ema, flatten, generator, tree_cosine, unflatten, uniform

Tensor = torch.Tensor
LayerTree = Tuple[Optional[Tuple[Tensor, ...]], ...]

__all__ = [
    "ALASState",
    "alas_init",
    "alas_update",
    "should_backward",
    "interpolate",
    "reset_activity",
    "layer_heat",
    "state_nbytes",
    "flatten",
    "unflatten",
]

_STREAM_DECIDE = 1
_STREAM_NOISE = 2


class ALASState(NamedTuple):
    """Immutable state of ALAS for ``L`` layers (see the module docstring)."""

    step: Tensor  # int64 scalar: updates seen
    heat: Tensor  # [L] float32, smoothed rms(g) / rms(w)
    stability: Tensor  # [L] float32 in [0, 1]
    activity: Tensor  # [L] float32 in [min_activity, 1]
    fidelity: Tensor  # [L] float32, last measured cosine(prediction, real); NaN before the first
    measured_at: Tensor  # [L] int64, the update (``step`` before it) that last measured ``fidelity``; -1: never
    skip_streak: Tensor  # [L] int64, consecutive steps without a real gradient
    observed: Tensor  # [L] int64, number of real gradients seen
    avg: Tuple[Tensor, ...]  # per layer, flat: decayed normalised average of past real gradients
    avg_weight: Tensor  # [L] float64, sum of the decay weights behind ``avg``
    last: Tuple[Tensor, ...]  # per layer, flat: last real gradient
    prev: Tuple[Tensor, ...]  # per layer, flat: the one before


def alas_init(params: Sequence[Sequence[Tensor]], *, history_dtype: Optional[torch.dtype] = None,
              history: bool = True) -> ALASState:
    """A fresh state for the layers whose parameters are ``params``.

    Args:
        params: per layer, its parameter tensors (sizes and dtype are taken from them).
        history_dtype: dtype of the gradient history (default: the parameters' dtype).
            The history of a layer is kept as flat vectors (one per quantity),
            in the order of its parameters, so that every update is a handful
            of large operations rather than several per tensor.
        history: keep the gradient history (needed by :func:`interpolate`);
            ``False`` when predictions come from elsewhere (the optimizer's
            first moment), so the state holds no per-parameter memory.

    Returns:
        An ``ALASState`` with every activity at 1 (nothing is skipped before
        anything has been measured).

    Example:
        >>> import torch
        >>> s = alas_init(((torch.zeros(3),), (torch.zeros(2, 2),)))
        >>> s.activity.tolist()
        [1.0, 1.0]
    """
    n = len(params)
    zeros = tuple(
        torch.zeros(sum(p.numel() for p in layer) if history else 0,
                    dtype=history_dtype or (layer[0].dtype if layer else torch.float32))
        for layer in params)
    return ALASState(
        step=torch.zeros((), dtype=torch.int64),
        heat=torch.zeros(n),
        stability=torch.zeros(n),
        activity=torch.ones(n),
        fidelity=torch.full((n,), float("nan")),
        measured_at=torch.full((n,), -1, dtype=torch.int64),
        skip_streak=torch.zeros(n, dtype=torch.int64),
        observed=torch.zeros(n, dtype=torch.int64),
        avg=zeros,
        avg_weight=torch.zeros(n, dtype=torch.float64),
        last=zeros,
        prev=zeros,
    )


def layer_heat(grads: Sequence[Tensor], params: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """``rms(g) / rms(w)`` of one layer (over all its elements), a float32 scalar.

    The root-mean-square is the magnitude used (one fused norm per tensor list);
    the ratio is scale-free like the specification's gradient magnitude over
    weight magnitude.
    """
    g = torch.stack(torch._foreach_norm([x.detach() for x in grads])).double().norm()
    w = torch.stack(torch._foreach_norm([x.detach() for x in params])).double().norm()
    return (g / w.clamp_min(eps)).float()


def _predict(state: ALASState, layer: int, trend_weight: float) -> Tensor:
    """The deterministic part of the (flat) prediction for ``layer``: average plus trend."""
    avg, last, prev = state.avg[layer], state.last[layer], state.prev[layer]
    if int(state.observed[layer]) < 2 or trend_weight == 0:
        return avg.clone()  # never hand out the state's own tensors
    return torch.add(avg, last - prev, alpha=trend_weight)


def alas_update(
    state: ALASState,
    grads: LayerTree,
    params: Sequence[Sequence[Tensor]],
    *,
    min_activity: float = 0.3,
    activity_decay: float = 0.95,
    interp_decay: float = 0.9,
    trend_weight: float = 0.2,
    min_fidelity: float = 0.0,
    predicted: Optional[Sequence[Optional[Sequence[Tensor]]]] = None,
    measure: bool = True,
) -> ALASState:
    """Fold one step's real gradients into the state.

    Args:
        state: the current state.
        grads: per layer, its real gradients this step, or ``None`` where the
            layer's backward was skipped. Layers with a non-finite gradient are
            treated as not observed (nothing non-finite enters the state).
        params: per layer, its current parameters (for ``heat``).
        min_activity: lower bound of ``activity``.
        activity_decay: smoothing of ``heat``, ``stability`` and ``activity``.
        interp_decay: decay of the gradient average used by :func:`interpolate`.
        trend_weight: weight of the trend term used to measure fidelity.
        min_fidelity: the fidelity below which a layer counts as unpredictable:
            ``stability`` follows ``clamp((cos - min_fidelity) / (1 - min_fidelity), 0, 1)``,
            so a layer whose measured fidelity stays at or below it is never skipped.
        predicted: per layer, the prediction (tensors shaped like the layer's
            parameters) to measure fidelity against, e.g. the optimizer's first
            moment; ``None`` (or ``None`` for a layer) uses the state's own
            history (see :func:`interpolate`).
        measure: ``False`` only counts which layers computed their gradient
            (skip streaks) and touches no gradient: the cheap update of a step
            on which nothing is measured.

    Returns:
        The new state; ``state`` and the inputs are not modified.
    """
    n = len(grads)
    if n != state.heat.numel():
        raise ValueError(f"alas_update: got gradients for {n} layers, the state has {state.heat.numel()}")
    heat = state.heat.clone()
    stability = state.stability.clone()
    fidelity = state.fidelity.clone()
    measured_at = state.measured_at.clone()
    streak = state.skip_streak.clone()
    observed = state.observed.clone()
    avg_weight = state.avg_weight.clone()
    avg, last, prev = list(state.avg), list(state.last), list(state.prev)
    history = any(a.numel() for a in avg)
    for i, g in enumerate(grads):
        if g is not None and not measure:
            streak[i] = 0
            continue
        if g is not None:
            g = flatten(g, avg[i].dtype if history else torch.float32)  # a new copy: it becomes ``last``
            h = layer_heat((g,), params[i])
        if g is None or not bool(torch.isfinite(h)):  # non-finite iff a gradient is
            streak[i] += 1
            continue
        pred = None if predicted is None or predicted[i] is None else flatten(predicted[i], torch.float32)
        if pred is not None or (history and observed[i] > 0):
            cos = tree_cosine(pred if pred is not None else _predict(state, i, trend_weight), g).float()
            fidelity[i] = cos
            measured_at[i] = state.step
            usable = ((cos - min_fidelity) / (1.0 - min_fidelity)).clamp(0.0, 1.0)
            stability[i] = ema(stability[i], usable, activity_decay)
        heat[i] = h if observed[i] == 0 else ema(heat[i], h, activity_decay)
        observed[i] += 1
        streak[i] = 0
        if not history:
            continue
        w_old = avg_weight[i] * interp_decay
        avg_weight[i] = w_old + 1.0
        a = float(w_old / avg_weight[i])
        avg[i] = torch.lerp(avg[i], g, 1.0 - a)
        prev[i] = last[i]
        last[i] = g
    seen = heat > 0
    mean_heat = heat[seen].mean() if bool(seen.any()) else torch.tensor(0.0)
    cold = torch.where(seen, (mean_heat / heat.clamp_min(1e-30)).clamp(max=1.0), torch.zeros_like(heat))
    target = 1.0 - (1.0 - min_activity) * stability * cold
    activity = ema(state.activity, target, activity_decay).clamp(min_activity, 1.0)
    return ALASState(
        step=state.step + 1,
        heat=heat,
        stability=stability,
        activity=activity,
        fidelity=fidelity,
        measured_at=measured_at,
        skip_streak=streak,
        observed=observed,
        avg=tuple(avg),
        avg_weight=avg_weight,
        last=tuple(last),
        prev=tuple(prev),
    )


def should_backward(
    state: ALASState,
    *,
    honest: bool = False,
    seed: int = 0,
    max_consecutive_skips: int = 5,
    u: Optional[Tensor] = None,
) -> Tensor:
    """Which layers compute an honest backward on the next step.

    The decision is ``u < activity`` with ``u`` uniform, drawn from
    ``(seed, state.step)`` only (so every process takes the same decision).
    A layer always computes its backward when ``honest`` is set (warm-up and
    honest checks), when it has no gradient history yet, or after
    ``max_consecutive_skips`` skipped steps in a row.

    Args:
        state: the current state.
        honest: force an honest backward of every layer.
        seed: the run's seed.
        max_consecutive_skips: longest run of skipped steps a layer may have.
        u: override of the uniform draws (shape ``[L]``), for tests.

    Returns:
        A bool tensor ``[L]``: ``True`` = compute the real gradient.

    Example:
        >>> import torch
        >>> s = alas_init(((torch.zeros(3),),))
        >>> should_backward(s).tolist()
        [True]
    """
    n = state.activity.numel()
    if honest:
        return torch.ones(n, dtype=torch.bool)
    if u is None:
        u = uniform(seed, int(state.step), _STREAM_DECIDE, n)
    mask = u.double() < state.activity.double()  # full precision: activity 1 never skips
    mask = mask | (state.observed == 0) | (state.skip_streak >= max_consecutive_skips)
    return mask


def interpolate(
    state: ALASState,
    layers: Sequence[int],
    *,
    trend_weight: float = 0.2,
    noise_scale: float = 0.05,
    seed: int = 0,
) -> Tuple[Tensor, ...]:
    """Predicted gradients for ``layers`` from their history.

    ``prediction = avg + trend_weight * (last - prev) + noise``, where ``avg``
    is the normalised exponentially decayed average of the layer's past real
    gradients (weights ``interp_decay ** age``), the trend term uses the last
    two real gradients, and ``noise`` is Gaussian with standard deviation
    ``noise_scale * mean|avg + trend|`` (per layer), drawn from
    ``(seed, state.step, layer)`` only.

    Args:
        state: the current state.
        layers: indices of the layers to predict.
        trend_weight: weight of the trend term.
        noise_scale: relative scale of the exploration noise (0 disables it).
        seed: the run's seed.

    Returns:
        One flat vector per requested layer (dtype of the history, parameters
        in order; :func:`unflatten` gives them the parameters' shapes).
    """
    out = []
    for i in layers:
        if int(state.observed[i]) == 0:
            raise ValueError(f"interpolate: layer {i} has no gradient history yet")
        base = _predict(state, i, trend_weight)
        if noise_scale > 0:
            gen = generator(seed, int(state.step), 1000 + int(i) * 7 + _STREAM_NOISE)
            noise = torch.randn(base.shape, generator=gen, dtype=torch.float32).to(base)
            base = base + noise_scale * base.abs().mean() * noise
        out.append(base)
    return tuple(out)


def reset_activity(state: ALASState) -> ALASState:
    """Every layer back to full activity and zero stability (used after a loss spike)."""
    return state._replace(
        activity=torch.ones_like(state.activity),
        stability=torch.zeros_like(state.stability),
        skip_streak=torch.zeros_like(state.skip_streak),
    )


def state_nbytes(state: ALASState) -> int:
    """Bytes held by the state's tensors (dominated by the gradient history)."""
    return sum(x.numel() * x.element_size() for x in optree.tree_leaves(state))
