"""Stepping back: each component watches whether it is helping and turns itself off when it is not.

A component that does not help still costs time (its bookkeeping) and may
cost quality, so each one carries a rule, judged on what it measured in the
run itself, after which it *steps back*: it is off for the rest of the run,
its bookkeeping stops, the event is logged by the adapters and counted in the
statistics. ``step_back_after = 0`` turns every rule off.

- **ALAS** steps back after ``step_back_after`` honest checks in a row (past
  the warm-up) at which no layer measured there had a prediction fidelity
  (cosine between the prediction and the real gradient) above
  ``min_fidelity`` (a check with no prediction to measure, e.g. an optimizer
  without a first moment for ``predictor="momentum"``, counts the same): no
  layer is predictable enough to be skipped without losing more than it saves.
- **Sample weighting** steps back after ``step_back_after`` weighted steps in
  a row on which it saved no work. Re-weighting never does: a down-weighted
  sample costs its full forward and backward, so it cannot make training
  reach a quality sooner by saving time, and it changes the objective the
  model is trained on (measured on ``flashfn bench``: it ended up to 0.7%
  worse in held-out loss where it acted, and never acted on the language
  model). It acts for ``step_back_after`` steps, is counted, and steps back.
- **GCA** steps back after ``step_back_after`` checkpoint windows in a row
  without a virtual step (coherence never reached ``coherence_threshold``),
  or after its second rollback (its virtual steps made the loss rise twice).

Every rule reads only counts the run produced, so the decision is the same
on every process of a data-parallel run that shares those counts.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional

import torch

Tensor = torch.Tensor

__all__ = ["COMPONENTS", "StepBackState", "stepback_init", "stepback_update", "is_stepped_back", "step_back_messages"]

#: The components, in the order of :attr:`StepBackState.off`.
COMPONENTS = ("alas", "weighting", "gca")

#: Rollbacks after which GCA steps back.
GCA_MAX_ROLLBACKS = 2


class StepBackState(NamedTuple):
    """Which components stepped back, when, and the evidence counted so far."""

    off: Tensor  # [3] bool, per component of COMPONENTS
    at: Tensor  # [3] int64, the step at which it stepped back (-1: it did not)
    idle: Tensor  # [3] int64, consecutive measurements without benefit
    rollbacks: Tensor  # int64, GCA rollbacks seen


def stepback_init() -> StepBackState:
    """Nothing stepped back.

    Example:
        >>> stepback_init().off.tolist()
        [False, False, False]
    """
    return StepBackState(off=torch.zeros(3, dtype=torch.bool), at=torch.full((3,), -1, dtype=torch.int64),
                         idle=torch.zeros(3, dtype=torch.int64), rollbacks=torch.zeros((), dtype=torch.int64))


def is_stepped_back(state: StepBackState, component: str) -> bool:
    """Whether ``component`` (one of :data:`COMPONENTS`) has stepped back."""
    return bool(state.off[COMPONENTS.index(component)])


def stepback_update(
    state: StepBackState,
    step: int,
    *,
    step_back_after: int,
    alas_useful: Optional[bool] = None,
    weighting_saved_work: Optional[bool] = None,
    gca_window_virtual: Optional[int] = None,
    gca_rollback: bool = False,
) -> StepBackState:
    """Fold one step's evidence in (pure).

    Args:
        state: the current state.
        step: the number of optimizer steps completed with this one (recorded in
            ``at`` when a component steps back; ``flash_update`` passes ``state.step + 1``).
        step_back_after: consecutive measurements without benefit before a
            component steps back (0: never).
        alas_useful: ``None`` when ALAS measured nothing this step; else
            whether some layer's fidelity was above ``min_fidelity``.
        weighting_saved_work: ``None`` when no weights were applied; else whether
            weighting saved work this step (re-weighting alone: ``False``).
        gca_window_virtual: ``None`` unless a GCA checkpoint window closed this
            step; else how many virtual steps were taken in it.
        gca_rollback: GCA rolled back this step.

    Returns:
        The new state. A component that stepped back stays back.

    Example:
        >>> s = stepback_init()
        >>> for t in range(3):
        ...     s = stepback_update(s, t, step_back_after=3, weighting_saved_work=False)
        >>> is_stepped_back(s, "weighting"), int(s.at[1])
        (True, 2)
    """
    if step_back_after <= 0:
        return state
    off, at, idle = state.off.clone(), state.at.clone(), state.idle.clone()
    rollbacks = state.rollbacks + int(gca_rollback)
    evidence = (
        None if alas_useful is None else not alas_useful,
        None if weighting_saved_work is None else not weighting_saved_work,
        None if gca_window_virtual is None else gca_window_virtual == 0,
    )
    for k, useless in enumerate(evidence):
        if bool(off[k]) or useless is None:
            continue
        idle[k] = idle[k] + 1 if useless else 0
    trip = [bool(idle[k] >= step_back_after) for k in range(3)]
    trip[2] = trip[2] or int(rollbacks) >= GCA_MAX_ROLLBACKS
    for k in range(3):
        if trip[k] and not bool(off[k]):
            off[k] = True
            at[k] = step
    return StepBackState(off=off, at=at, idle=idle, rollbacks=rollbacks)


def step_back_messages(old: StepBackState, new: StepBackState, cfg: Any) -> List[str]:
    """One line per component that stepped back between ``old`` and ``new`` (for the adapters' logs).

    Example:
        >>> from flashfn import FlashConfig
        >>> s = stepback_update(stepback_init(), 7, step_back_after=1, gca_window_virtual=0)
        >>> step_back_messages(stepback_init(), s, FlashConfig(step_back_after=1))[0][:34]
        'Flash Mode: GCA steps back at step'
    """
    why = {
        "alas": f"no layer's prediction fidelity was above min_fidelity={cfg.min_fidelity} at "
                f"{cfg.step_back_after} honest checks in a row: skipping would lose more than it saves",
        "weighting": f"re-weighting saved no work on {cfg.step_back_after} weighted steps in a row (a down-weighted "
                     "sample costs its full forward and backward) and only changes what the model is trained on; "
                     "step_back_after=0 keeps it on",
        "gca": (f"its virtual steps made the loss rise ({int(new.rollbacks)} rollbacks)"
                if int(new.rollbacks) >= GCA_MAX_ROLLBACKS else
                f"coherence stayed below coherence_threshold={cfg.coherence_threshold} for "
                f"{cfg.step_back_after} checkpoint windows in a row: no virtual step to take"),
    }
    names = {"alas": "ALAS", "weighting": "sample weighting", "gca": "GCA"}
    return [f"Flash Mode: {names[k]} steps back at step {int(new.at[i])} (off for the rest of the run): {why[k]}."
            for i, k in enumerate(COMPONENTS) if bool(new.off[i]) and not bool(old.off[i])]
