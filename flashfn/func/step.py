"""The ``torch.func`` training step: gradients only for the layers ALAS chose, the rest predicted.

A custom loop composes it like this (``examples/functional_loop.py`` runs it)::

    lmap = find_layers(model)
    skipper = BlockSkipper(model, lmap, cfg.alas_mechanism)
    params = dict(model.named_parameters())
    state = flash_init_for(model, lmap, params, cfg=cfg)
    for batch in batches:
        plan = plan_step(state, cfg)
        grads, loss, aux = masked_value_and_grad(per_sample_loss, params, buffers, batch,
                                                 lmap=lmap, plan=plan, skipper=skipper)
        state, grads, decision = finish_step(state, cfg, plan, lmap, params, grads, loss, aux.weights,
                                             optimizer=opt)  # the "momentum" predictor reads its first moment
        apply_gradients(params, grads); opt.step()
        snap = gca_after_step(decision, params, opt, snap)  # virtual steps reuse the gradients: before zero_grad

``per_sample_loss(params, buffers, batch) -> [N]`` returns one loss per
sample (``reduction="none"``); the plain loss is their mean.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.func import grad

from ..core.flash import FlashState, StepPlan, component_on, flash_init, flash_update, uses_history
from ..core.gca import GCADecision
from ..core.weighting import weigh_samples, weighted_loss
from .layers import LayerMap, split_by_layer
from .skipping import BlockSkipper

Tensor = torch.Tensor

__all__ = [
    "StepAux",
    "Snapshot",
    "flash_init_for",
    "masked_value_and_grad",
    "finish_step",
    "apply_gradients",
    "take_snapshot",
    "restore_snapshot",
    "virtual_steps",
    "gca_after_step",
    "first_moments",
]


class StepAux(NamedTuple):
    """Side results of :func:`masked_value_and_grad`."""

    losses: Tensor  # per-sample losses, detached
    weights: Optional[Tensor]  # sample weights applied (None when not weighing)


def flash_init_for(model: nn.Module, lmap: LayerMap, params: Dict[str, Tensor], **kwargs: Any) -> FlashState:
    """``flash_init`` for a model's parameter dict (GCA follows every parameter).

    ``cfg=`` (a ``FlashConfig``) may be given instead of ``history``/``history_dtype``/``with_gca``.
    """
    del model
    cfg = kwargs.pop("cfg", None)
    if cfg is not None:
        kwargs = {"history": uses_history(cfg), "history_dtype": cfg.history_dtype, "with_gca": cfg.enable_gca,
                  **kwargs}
    return flash_init(split_by_layer(lmap, params), tuple(params[n] for n in lmap.others), **kwargs)


def masked_value_and_grad(
    per_sample_loss: Callable[[Dict[str, Tensor], Dict[str, Tensor], Any], Tensor],
    params: Dict[str, Tensor],
    buffers: Dict[str, Tensor],
    batch: Any,
    *,
    lmap: LayerMap,
    plan: StepPlan,
    skipper: Optional[BlockSkipper] = None,
    min_sample_weight: float = 0.3,
    low_loss_threshold: float = 0.5,
    sample_weights: Optional[Tensor] = None,
    normaliser: Optional[float] = None,
) -> Tuple[Dict[str, Tensor], Tensor, StepAux]:
    """Loss and gradients of the parameters outside every layer and of the layers ``plan`` computes.

    The parameters of skipped layers are not differentiated (``torch.func.grad``
    over the active subset only); with a ``"branch"`` ``skipper`` their blocks
    also run without autograd, so their whole backward is skipped. When
    ``plan.weigh`` the loss is :func:`~flashfn.core.weighting.weighted_loss`
    with :func:`~flashfn.core.weighting.weigh_samples` weights; otherwise it is
    the plain mean of the per-sample losses. ``sample_weights`` (e.g. from
    :func:`~flashfn.core.pruning.prune_samples`) multiply the per-sample losses
    too, and ``normaliser`` replaces the batch size as the divisor (the
    original batch size when samples were pruned, so the loss stays unbiased).

    Returns:
        ``(grads, loss, aux)``: gradients of the differentiated parameters
        only, the plain (unweighted by ``plan.weigh``) mean loss (with
        ``sample_weights``/``normaliser``: their estimate of the whole batch's
        mean loss), and a :class:`StepAux`.
    """
    skipped = set(plan.skipped)
    frozen_names = {n for i in skipped for n in lmap.params[i]}
    diff = {k: v.detach() for k, v in params.items() if k not in frozen_names}
    const = {k: v.detach() for k, v in params.items() if k in frozen_names}

    plain_mean = sample_weights is None and normaliser is None

    def f(d: Dict[str, Tensor]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        losses = per_sample_loss({**const, **d}, buffers, batch)
        w = (weigh_samples(losses, min_weight=min_sample_weight, low_loss_threshold=low_loss_threshold)
             if plan.weigh else losses.new_ones(()))
        if plain_mean and not plan.weigh:
            return losses.mean(), (losses.detach(), w)
        scale = w if sample_weights is None else w * sample_weights
        return weighted_loss(losses, scale, normaliser), (losses.detach(), w)

    if skipper is not None:
        skipper.set(sorted(skipped), toggle_requires_grad=False)
    try:
        grads, aux = grad(f, has_aux=True)(diff)
    finally:
        if skipper is not None:
            skipper.clear()
    losses, w = aux
    # with pruning: the unbiased estimate of the whole batch's mean loss (pruned samples are not in ``losses``)
    plain = losses.mean() if plain_mean else weighted_loss(
        losses, losses.new_ones(()) if sample_weights is None else sample_weights, normaliser)
    return grads, plain, StepAux(losses, w if plan.weigh else None)


def finish_step(
    state: FlashState,
    cfg: Any,
    plan: StepPlan,
    lmap: LayerMap,
    params: Dict[str, Tensor],
    grads: Dict[str, Tensor],
    loss: Tensor,
    weights: Optional[Tensor] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Tuple[FlashState, Dict[str, Tensor], GCADecision]:
    """Fold the step into the state and complete the gradient dict with ALAS's predictions.

    ``optimizer`` is read (never changed) with ``cfg.predictor == "momentum"``:
    its first moments are the predictions (see :func:`first_moments`).

    Returns:
        ``(new_state, grads, decision)``: ``grads`` holds every parameter that
        gets a gradient this step (a skipped layer is absent with
        ``predictor="none"``); ``decision`` is GCA's.
    """
    layer_grads = tuple(None if not bool(plan.compute[i]) else tuple(grads[n] for n in names)
                        for i, names in enumerate(lmap.params))
    other_grads = tuple(grads[n] for n in lmap.others) if cfg.enable_gca else None
    layer_params = split_by_layer(lmap, params)
    reads_moments = cfg.predictor == "momentum" and component_on(state, cfg, "alas")
    if reads_moments and optimizer is None:
        raise ValueError('finish_step: FlashConfig(predictor="momentum") predicts from the optimizer\'s first moment: '
                         'pass optimizer=..., or use predictor="ema" (its own history) or "none"')
    predicted = first_moments(optimizer, layer_params) if reads_moments else None
    new_state, preds, decision = flash_update(state, cfg, plan, layer_grads, layer_params, loss,
                                              other_grads=other_grads, weights=weights, predicted=predicted)
    full = dict(grads)
    for i, p in enumerate(preds):
        if p is not None:
            full.update(zip(lmap.params[i], p))
    return new_state, full, decision


def first_moments(optimizer: Any, layers: Any) -> Tuple[Optional[Tuple[Tensor, ...]], ...]:
    """Per layer, the optimizer's first moment of each of its parameters (``FlashConfig.predictor="momentum"``).

    Adam-family optimizers keep it as ``exp_avg``, SGD with momentum as
    ``momentum_buffer``. A layer is ``None`` where any of its parameters has
    none (yet): it then gets no prediction.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([w])
        >>> first_moments(opt, [[w]])
        (None,)
        >>> w.grad = torch.ones(2); opt.step()
        >>> first_moments(opt, [[w]])[0][0].tolist()
        [0.10000000149011612, 0.10000000149011612]
    """
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", {})
    out = []
    for layer in layers:
        moments = []
        for p in layer:
            entry = state.get(p) or {}
            m = entry.get("exp_avg", entry.get("momentum_buffer"))
            if m is None:
                moments = None
                break
            moments.append(m)
        out.append(None if moments is None else tuple(moments))
    return tuple(out)


def apply_gradients(params: Dict[str, Tensor], grads: Dict[str, Tensor]) -> None:
    """Set ``p.grad`` for every parameter in ``grads`` and ``None`` for the others (so optimizers skip them)."""
    for name, p in params.items():
        g = grads.get(name)
        p.grad = None if g is None else g.detach().to(p.dtype)


class Snapshot(NamedTuple):
    """Parameters and optimizer state, copied, for a GCA rollback."""

    params: Dict[str, Tensor]
    optimizer: Dict[str, Any]


def take_snapshot(params: Dict[str, Tensor], optimizer: torch.optim.Optimizer) -> Snapshot:
    """Copy the parameters and the optimizer state."""
    return Snapshot({k: v.detach().clone() for k, v in params.items()}, copy.deepcopy(optimizer.state_dict()))


def restore_snapshot(snap: Snapshot, params: Dict[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Restore the parameters and the optimizer's per-parameter state of ``snap`` exactly (in place).

    The param groups' hyper-parameters (learning rate, ...) keep their current
    values: they belong to the schedule, which a rollback does not rewind.
    """
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(snap.params[k])
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
    for group, saved in zip(optimizer.param_groups, hyper):
        group.update(saved)


def virtual_steps(optimizer: torch.optim.Optimizer, n: int) -> None:
    """``n`` more ``optimizer.step()`` calls on the gradients already in place (no learning-rate schedule step)."""
    for _ in range(int(n)):
        optimizer.step()


def gca_after_step(decision: GCADecision, params: Dict[str, Tensor], optimizer: torch.optim.Optimizer,
                   snapshot: Optional[Snapshot]) -> Optional[Snapshot]:
    """Carry out GCA's decision after the real optimizer step; returns the snapshot to keep.

    Order: a rollback restores the last snapshot (and takes no virtual step);
    otherwise a checkpoint snapshots the state *before* the virtual steps, then
    the virtual steps are taken.
    """
    if decision.rollback:
        if snapshot is not None:
            restore_snapshot(snapshot, params, optimizer)
        return snapshot
    if decision.checkpoint:
        snapshot = take_snapshot(params, optimizer)
    if decision.take:
        virtual_steps(optimizer, decision.n_virtual)
    return snapshot
