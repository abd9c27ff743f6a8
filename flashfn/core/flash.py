"""All of Flash Mode as one pure state machine: plan a step, then fold its outcome in.

``plan_step`` says what the next optimizer step does (honest or not, which
layers compute their backward, whether samples are weighted);
``flash_update`` takes what really happened (the real per-layer gradients,
the loss, the weights applied) and returns the gradients to apply (real ones,
plus predictions for skipped layers), the new state and the GCA decision.
The ``torch.func`` step (``flashfn.func.step``) and the Trainer callback both
drive this same pair.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .alas import ALASState, alas_init, alas_update, interpolate, reset_activity, should_backward, unflatten
from .gca import GCADecision, GCAState, gca_init, gca_reset, gca_update
from .safety import SafetyState, is_active, is_honest_step, safety_init, safety_update
from .stepback import StepBackState, is_stepped_back, stepback_init, stepback_update
from .weighting import WeightingState, weighting_init, weighting_update

Tensor = torch.Tensor

__all__ = ["Counters", "FlashState", "StepPlan", "component_on", "flash_init", "history_dtype_of", "plan_step",
           "flash_update", "uses_history"]

#: ``FlashConfig.history_dtype`` names and the dtypes they stand for.
HISTORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def history_dtype_of(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """The torch dtype of ALAS's gradient history: a ``FlashConfig.history_dtype`` name, a dtype, or ``None``.

    Example:
        >>> history_dtype_of("bfloat16")
        torch.bfloat16
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in HISTORY_DTYPES:
        raise ValueError(f"history_dtype must be one of {tuple(HISTORY_DTYPES)} or a torch.dtype, got {dtype!r}")
    return HISTORY_DTYPES[dtype]


class Counters(NamedTuple):
    """What happened so far, counted (the statistics are computed from these)."""

    steps: Tensor  # optimizer steps
    active_steps: Tensor  # steps on which Flash Mode acted (past warm-up, not disabled)
    honest_steps: Tensor  # steps with every layer's real gradient
    layer_steps: Tensor  # layers x steps
    skipped_layer_steps: Tensor  # of which skipped
    param_steps: Tensor  # ALAS-layer parameters x steps (float64)
    skipped_param_steps: Tensor  # of which skipped
    virtual_steps: Tensor
    nonfinite_steps: Tensor


def _counters_init() -> Counters:
    z = torch.zeros((), dtype=torch.int64)
    zf = torch.zeros((), dtype=torch.float64)
    return Counters(z, z, z, z, z, zf, zf, z, z)


class FlashState(NamedTuple):
    """The whole state of Flash Mode."""

    step: Tensor  # int64, optimizer steps done
    alas: ALASState
    gca: GCAState
    safety: SafetyState
    weighting: WeightingState
    counters: Counters
    layer_sizes: Tensor  # [L] int64, parameters per layer
    stepback: StepBackState  # which components stepped back (see flashfn.core.stepback)


class StepPlan(NamedTuple):
    """What the next step does."""

    active: bool  # Flash Mode acts (else: plain training)
    honest: bool  # every layer computes its real gradient
    compute: Tensor  # [L] bool, layers that compute their backward
    weigh: bool  # apply sample weights

    @property
    def skipped(self) -> Tuple[int, ...]:
        """Indices of the layers whose backward is skipped."""
        return tuple(int(i) for i in torch.nonzero(~self.compute).flatten())


def flash_init(layer_params: Sequence[Sequence[Tensor]], other_params: Sequence[Tensor],
               *, history_dtype: Union[str, torch.dtype, None] = None, with_gca: bool = True,
               history: bool = True) -> FlashState:
    """A fresh state.

    Args:
        layer_params: per ALAS layer, its parameter tensors.
        other_params: the parameters outside every layer (always honest).
        history_dtype: dtype of ALAS's gradient history: a torch dtype or a
            ``FlashConfig.history_dtype`` name (``"float32"``, ``"bfloat16"``);
            ``None`` keeps the parameters' dtype.
        with_gca: allocate GCA's direction (two copies of the gradient); with
            ``False`` GCA cannot be used with this state.
        history: keep ALAS's gradient history (``FlashConfig.predictor``
            ``"ema"`` or ``"none"``); the ``"momentum"`` predictor needs none.

    Example:
        >>> import torch
        >>> s = flash_init(((torch.zeros(2),),), (torch.zeros(3),))
        >>> s.layer_sizes.tolist()
        [2]
    """
    layer_params = tuple(tuple(p.detach() for p in layer) for layer in layer_params)
    gradient_like = (tuple(p.detach() for p in other_params), layer_params)
    sizes = torch.tensor([sum(p.numel() for p in layer) for layer in layer_params], dtype=torch.int64)
    return FlashState(
        step=torch.zeros((), dtype=torch.int64),
        alas=alas_init(layer_params, history_dtype=history_dtype_of(history_dtype), history=history),
        gca=gca_init(gradient_like if with_gca else ()),
        safety=safety_init(),
        weighting=weighting_init(),
        counters=_counters_init(),
        layer_sizes=sizes,
        stepback=stepback_init(),
    )


def uses_history(cfg: Any) -> bool:
    """Whether ``cfg``'s predictor needs ALAS's gradient history (``"momentum"`` does not)."""
    return cfg.predictor != "momentum"


def component_on(state: FlashState, cfg: Any, component: str) -> bool:
    """``component`` (``"alas"``, ``"weighting"``, ``"gca"``) is enabled in ``cfg`` and has not stepped back."""
    flag = {"alas": cfg.enable_alas, "weighting": cfg.enable_sample_weighting, "gca": cfg.enable_gca}[component]
    return bool(flag) and not is_stepped_back(state.stepback, component)


def plan_step(state: FlashState, cfg: Any, *, u: Optional[Tensor] = None) -> StepPlan:
    """Plan the next optimizer step (pure; ``cfg`` is a ``FlashConfig``; ``u`` overrides ALAS's draws)."""
    n = int(state.layer_sizes.numel())
    active = is_active(state.safety, warmup_steps=cfg.warmup_steps, auto_disable_on_spike=cfg.auto_disable_on_spike)
    honest = (not active) or (not component_on(state, cfg, "alas")) or is_honest_step(
        int(state.step), warmup_steps=cfg.warmup_steps, honest_check_every=cfg.honest_check_every)
    compute = should_backward(state.alas, honest=honest, seed=cfg.seed,
                              max_consecutive_skips=cfg.max_consecutive_skips, u=u)
    if n == 0:
        compute = torch.zeros(0, dtype=torch.bool)
    return StepPlan(active=active, honest=bool(compute.all()), compute=compute,
                    weigh=active and component_on(state, cfg, "weighting"))


def flash_update(
    state: FlashState,
    cfg: Any,
    plan: StepPlan,
    layer_grads: Sequence[Optional[Sequence[Tensor]]],
    layer_params: Sequence[Sequence[Tensor]],
    loss: float | Tensor,
    *,
    other_grads: Optional[Sequence[Tensor]] = None,
    weights: Optional[Tensor] = None,
    predicted: Optional[Sequence[Optional[Sequence[Tensor]]]] = None,
) -> Tuple[FlashState, Tuple[Optional[Tuple[Tensor, ...]], ...], GCADecision]:
    """Fold one step's outcome in.

    Args:
        state: the state the plan was made from.
        cfg: the ``FlashConfig``.
        plan: the plan of this step.
        layer_grads: per layer, the real gradient (``None`` where skipped).
        layer_params: per layer, the parameters.
        loss: the step's (unweighted) training loss.
        other_grads: the gradients of the parameters outside every layer, in
            the order given to :func:`flash_init`; with the layers' real or
            predicted gradients (zeros where there is neither) they make the
            gradient GCA follows. ``None`` skips GCA this step.
        weights: the sample weights applied this step, if any.
        predicted: with ``cfg.predictor == "momentum"``, per layer the
            optimizer's first moment (tensors shaped like the parameters, or
            ``None``): the prediction of a skipped layer, and what ALAS
            measures its fidelity against on honest steps (the only steps on
            which this predictor measures anything).

    Returns:
        ``(new_state, predictions, gca_decision)``: ``predictions[l]`` is the
        gradient to use for a skipped layer ``l`` (``None`` for a computed layer,
        or where there is no prediction: ``cfg.predictor == "none"``, or no
        first moment yet).
    """
    n = len(layer_grads)
    skipped = [i for i in range(n) if layer_grads[i] is None]
    preds: list = [None] * n
    momentum = cfg.predictor == "momentum"
    if skipped and cfg.predictor == "ema":
        for i, p in zip(skipped, interpolate(state.alas, skipped, trend_weight=cfg.trend_weight,
                                             noise_scale=cfg.noise_scale, seed=cfg.seed)):
            preds[i] = unflatten(p, layer_params[i])
    elif skipped and momentum and predicted is not None:
        for i in skipped:  # copies: the caller may clip them in place, the optimizer's own must not move
            preds[i] = None if predicted[i] is None else tuple(t.detach().clone() for t in predicted[i])
    alas = state.alas
    alas_on = component_on(state, cfg, "alas")
    # the scheduled honest checks (also every ``honest_check_every`` steps of the warm-up): where the
    # momentum predictor measures, and where every predictor's usefulness is judged
    check = (int(state.step) - cfg.warmup_steps) % cfg.honest_check_every == 0 and bool(plan.compute.all())
    measured = alas_on and (check or not momentum)
    if alas_on:  # with ALAS off (or stepped back) nothing reads its state: it costs nothing
        alas = alas_update(alas, tuple(None if g is None else tuple(g) for g in layer_grads), layer_params,
                           min_activity=cfg.min_activity, activity_decay=cfg.activity_decay,
                           interp_decay=cfg.interp_decay, trend_weight=cfg.trend_weight,
                           min_fidelity=cfg.min_fidelity, predicted=predicted if momentum else None,
                           measure=measured)
    safety, events = safety_update(state.safety, loss, warmup_steps=cfg.warmup_steps,
                                   loss_spike_threshold=cfg.loss_spike_threshold,
                                   auto_disable_on_spike=cfg.auto_disable_on_spike,
                                   spike_cooldown_steps=cfg.spike_cooldown_steps)
    gca = state.gca
    decision = GCADecision(False, 0, False, False)
    gca_on = component_on(state, cfg, "gca") and other_grads is not None
    if gca_on:
        completed = tuple(
            tuple(layer_grads[i]) if layer_grads[i] is not None
            else preds[i] if preds[i] is not None else tuple(torch.zeros_like(p) for p in layer_params[i])
            for i in range(n))
        gca, decision = gca_update(gca, (tuple(other_grads), completed), loss,
                                   coherence_threshold=cfg.coherence_threshold,
                                   max_virtual_steps=cfg.max_virtual_steps, checkpoint_every=cfg.gca_checkpoint_every,
                                   smoothing=cfg.gca_smoothing, rollback_threshold=cfg.loss_spike_threshold,
                                   allow_virtual=plan.active and not events.spike)
    if events.spike:  # a component that stepped back keeps its state as it was
        alas = reset_activity(alas) if alas_on else alas
        gca = gca_reset(gca) if gca_on else gca
    weighting = weighting_update(state.weighting, weights) if (weights is not None and plan.weigh) else state.weighting
    sizes = state.layer_sizes.double()
    mask = torch.tensor([g is None for g in layer_grads], dtype=torch.bool)
    c = state.counters
    counters = Counters(
        steps=c.steps + 1,
        active_steps=c.active_steps + int(plan.active),
        honest_steps=c.honest_steps + int(not skipped),
        layer_steps=c.layer_steps + n,
        skipped_layer_steps=c.skipped_layer_steps + len(skipped),
        param_steps=c.param_steps + sizes.sum(),
        skipped_param_steps=c.skipped_param_steps + (sizes[mask].sum() if n else 0.0),
        virtual_steps=c.virtual_steps + decision.n_virtual,
        nonfinite_steps=c.nonfinite_steps + int(events.nonfinite),
    )
    sb = state.stepback
    if cfg.step_back_after and plan.active:
        # judged on the layers measured at this check only; a check with nothing to measure against (no
        # prediction available) is a check without benefit too
        useful = None
        if alas_on and check:
            useful = bool(((alas.fidelity > cfg.min_fidelity) & (alas.measured_at == state.alas.step)).any())
        sb = stepback_update(
            sb, int(state.step) + 1, step_back_after=cfg.step_back_after, alas_useful=useful,
            weighting_saved_work=False if (weights is not None and plan.weigh) else None,  # re-weighting never does
            gca_window_virtual=(int(state.gca.virtual_since_ckpt)
                                if gca_on and decision.checkpoint and bool(state.gca.has_anchor) else None),
            gca_rollback=gca_on and decision.rollback)
    new = FlashState(state.step + 1, alas, gca, safety, weighting, counters, state.layer_sizes, sb)
    return new, tuple(preds), decision
