"""Conservative GCA (gradient coherence acceleration): pure functions over ``GCAState``.

On noisy minibatch gradients the cosine between two successive gradients says
little, so coherence is measured on a *smoothed direction*:

- ``direction`` is an exponential moving average of the gradient, kept as
  one flat float32 vector (the gradient pytree's leaves in order)
  (``direction = s * direction + (1 - s) * g``, ``s = gca_smoothing``);
- at every checkpoint (every ``checkpoint_every`` updates) the direction is
  stored as the ``anchor``;
- ``coherence`` is the cosine between the current direction and the anchor:
  close to 1 when the smoothed gradient has kept pointing the same way over
  the last window, i.e. in a stable phase.

When ``coherence >= coherence_threshold`` the update asks for
``n = min(max_virtual_steps, 1 + floor((c - t) / (1 - t) * max_virtual_steps))``
virtual steps (``t`` the threshold): one just above it, the maximum only near 1.

Safety: at each checkpoint the caller snapshots what it needs to restore
(parameters and optimizer state). The smoothed loss at the checkpoint is
kept; if virtual steps were taken since and the smoothed loss rises above
``rollback_threshold`` times it, the update signals a rollback and takes no
virtual step until the next checkpoint.

Reference: the Flash Mode specification's "Conservative GCA".
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from ._util import ema, flatten, tree_cosine

Tensor = torch.Tensor

__all__ = ["GCAState", "GCADecision", "gca_init", "gca_update", "gca_reset"]


class GCAState(NamedTuple):
    """Immutable state of conservative GCA."""

    step: Tensor  # int64, updates seen
    direction: Tensor  # flat float32 vector of the whole gradient (leaves in pytree order): smoothed gradient
    anchor: Tensor  # direction at the last checkpoint
    has_anchor: Tensor  # bool
    coherence: Tensor  # float64, last measured
    loss_ema: Tensor  # float64, smoothed loss (NaN before the first)
    ckpt_loss: Tensor  # float64, smoothed loss at the last checkpoint
    virtual_since_ckpt: Tensor  # int64
    virtual_total: Tensor  # int64
    rollbacks: Tensor  # int64
    checkpoints: Tensor  # int64


class GCADecision(NamedTuple):
    """What the caller should do after this update."""

    take: bool  # take virtual steps now
    n_virtual: int  # how many (0 when ``take`` is False)
    checkpoint: bool  # snapshot the state to restore on a rollback (before the virtual steps)
    rollback: bool  # restore the last snapshot


def gca_init(gradient_like: Any) -> GCAState:
    """A fresh state for gradients shaped like ``gradient_like`` (a tensor or a pytree of tensors).

    Example:
        >>> import torch
        >>> int(gca_init({"w": torch.zeros(3)}).step)
        0
    """
    z = torch.zeros((), dtype=torch.int64)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    size = sum(x.numel() for x in optree.tree_leaves(gradient_like))
    return GCAState(
        step=z, direction=torch.zeros(size), anchor=torch.zeros(size),
        has_anchor=torch.tensor(False), coherence=torch.zeros((), dtype=torch.float64), loss_ema=nan, ckpt_loss=nan,
        virtual_since_ckpt=z, virtual_total=z, rollbacks=z, checkpoints=z,
    )


def gca_reset(state: GCAState) -> GCAState:
    """Forget the direction and the anchor (after a loss spike); counters are kept."""
    return state._replace(
        direction=torch.zeros_like(state.direction), anchor=torch.zeros_like(state.anchor),
        has_anchor=torch.tensor(False), coherence=torch.zeros((), dtype=torch.float64),
        virtual_since_ckpt=torch.zeros((), dtype=torch.int64),
    )


def gca_update(
    state: GCAState,
    gradient: Any,
    loss: float | Tensor,
    *,
    coherence_threshold: float = 0.95,
    max_virtual_steps: int = 2,
    checkpoint_every: int = 5,
    smoothing: float = 0.8,
    rollback_threshold: float = 1.1,
    allow_virtual: bool = True,
) -> tuple[GCAState, GCADecision]:
    """Fold one real step's gradient and loss in; decide on virtual steps, checkpoint and rollback.

    Args:
        state: the current state.
        gradient: this step's gradient (tensor or pytree shaped like the state).
        loss: this step's loss.
        coherence_threshold: virtual steps only at or above this coherence.
        max_virtual_steps: the most virtual steps per real step.
        checkpoint_every: updates between checkpoints.
        smoothing: decay of the direction and of the smoothed loss.
        rollback_threshold: a smoothed-loss rise by this factor since the last
            checkpoint, with virtual steps taken since, asks for a rollback.
        allow_virtual: ``False`` measures without ever asking for virtual steps
            (warm-up, or Flash Mode disabled).

    Returns:
        ``(new_state, decision)``. A non-finite loss or gradient changes
        nothing but the step counter and asks for nothing.
    """
    loss_t = torch.as_tensor(loss, dtype=torch.float64).detach().reshape(()).clone()
    step = state.step + 1
    g = flatten(optree.tree_leaves(gradient), torch.float32)
    if g.numel() != state.direction.numel():
        raise ValueError(f"gca_update: the gradient has {g.numel()} elements, the state {state.direction.numel()}")
    if not bool(torch.isfinite(loss_t)) or not bool(torch.isfinite(g.norm())):
        return state._replace(step=step), GCADecision(False, 0, False, False)
    direction = torch.lerp(state.direction, g, 1.0 - smoothing)
    loss_ema = loss_t if bool(torch.isnan(state.loss_ema)) else ema(state.loss_ema, loss_t, smoothing)
    rollback = bool(
        state.virtual_since_ckpt > 0 and bool(torch.isfinite(state.ckpt_loss))
        and loss_ema > state.ckpt_loss * rollback_threshold
    )
    new = state._replace(step=step, direction=direction, loss_ema=loss_ema)
    if rollback:
        new = gca_reset(new)._replace(rollbacks=state.rollbacks + 1, loss_ema=state.ckpt_loss)
        return new, GCADecision(False, 0, False, True)
    coherence = tree_cosine(direction, state.anchor) if bool(state.has_anchor) else torch.zeros((), dtype=torch.float64)
    new = new._replace(coherence=coherence)
    checkpoint = int(step) % checkpoint_every == 0
    if checkpoint:
        new = new._replace(anchor=direction, has_anchor=torch.tensor(True), ckpt_loss=loss_ema,
                           virtual_since_ckpt=torch.zeros((), dtype=torch.int64), checkpoints=state.checkpoints + 1)
    n = 0
    c = float(coherence)
    if allow_virtual and max_virtual_steps > 0 and bool(state.has_anchor) and c >= coherence_threshold:
        frac = (c - coherence_threshold) / max(1.0 - coherence_threshold, 1e-12)
        n = int(min(max_virtual_steps, 1 + math.floor(frac * max_virtual_steps)))
    if n:
        new = new._replace(virtual_since_ckpt=new.virtual_since_ckpt + n, virtual_total=state.virtual_total + n)
    return new, GCADecision(n > 0, n, checkpoint, False)
