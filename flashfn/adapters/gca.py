"""``ConservativeGCA``: the specification's stateful GCA, a thin shell over :mod:`flashfn.core.gca`."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ..config import FlashConfig
from ..core.gca import GCADecision, GCAState, gca_init, gca_update

__all__ = ["ConservativeGCA"]


class ConservativeGCA:
    """Virtual optimizer steps when the smoothed gradient direction is coherent.

    Functional twin: :func:`flashfn.core.gca.gca_update`. The last decision
    (with its ``checkpoint`` and ``rollback`` signals) is kept in
    ``last_decision``; :func:`flashfn.func.gca_after_step` carries it out on an
    optimizer.

    Args:
        coherence_threshold: virtual steps only at or above this coherence.
        max_virtual_steps: at most this many virtual steps per real step.
        checkpoint_every: updates between checkpoints.
        smoothing: decay of the smoothed direction.
        rollback_threshold: smoothed-loss rise factor that triggers a rollback.

    Example:
        >>> import torch
        >>> gca = ConservativeGCA(coherence_threshold=0.95, max_virtual_steps=2, checkpoint_every=5)
        >>> gca.update(torch.ones(3), 1.0)
        (False, 0)
    """

    def __init__(self, coherence_threshold: float = 0.95, max_virtual_steps: int = 2, checkpoint_every: int = 5,
                 *, smoothing: float = 0.8, rollback_threshold: float = 1.1) -> None:
        cfg = FlashConfig.for_arguments(
            "ConservativeGCA",
            {"checkpoint_every": "gca_checkpoint_every", "smoothing": "gca_smoothing",
             "rollback_threshold": "loss_spike_threshold"},
            coherence_threshold=coherence_threshold, max_virtual_steps=max_virtual_steps,
            checkpoint_every=checkpoint_every, smoothing=smoothing, rollback_threshold=rollback_threshold)
        self.config = cfg
        self.state: Optional[GCAState] = None
        self.last_decision = GCADecision(False, 0, False, False)

    def update(self, gradient: Any, loss: Any) -> Tuple[bool, int]:
        """Fold a real step's gradient (tensor or pytree) and loss in; returns ``(take_virtual_steps, how_many)``."""
        if self.state is None:
            self.state = gca_init(gradient)
        c = self.config
        self.state, self.last_decision = gca_update(
            self.state, gradient, loss, coherence_threshold=c.coherence_threshold,
            max_virtual_steps=c.max_virtual_steps, checkpoint_every=c.gca_checkpoint_every,
            smoothing=c.gca_smoothing, rollback_threshold=c.loss_spike_threshold)
        return self.last_decision.take, self.last_decision.n_virtual

    def get_stats(self) -> Dict[str, Any]:
        """Updates seen, virtual steps, checkpoints, rollbacks and the last coherence."""
        if self.state is None:
            return {"updates": 0, "virtual_steps": 0, "virtual_share": 0.0, "checkpoints": 0, "rollbacks": 0,
                    "coherence": None}
        s = self.state
        n = int(s.step)
        return {
            "updates": n,
            "virtual_steps": int(s.virtual_total),
            "virtual_share": int(s.virtual_total) / n if n else 0.0,
            "checkpoints": int(s.checkpoints),
            "rollbacks": int(s.rollbacks),
            "coherence": float(s.coherence),
        }
