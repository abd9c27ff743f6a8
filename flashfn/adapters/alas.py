"""``ALASTracker``: the specification's stateful ALAS, a thin shell over :mod:`flashfn.core.alas`."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..config import FlashConfig
from ..core.alas import ALASState, alas_init, alas_update, should_backward, state_nbytes
from ..core.flash import history_dtype_of
from ..func.layers import LayerMap, find_layers

__all__ = ["ALASTracker"]


class ALASTracker:
    """Per-layer activity of a model and the stochastic backward decision.

    Functional twin: :func:`flashfn.core.alas.alas_update` and
    :func:`flashfn.core.alas.should_backward` (this class holds the
    ``ALASState`` and the current decision, nothing more).

    A layer is a repeated block (see :func:`flashfn.func.find_layers`);
    :meth:`should_compute_backward` accepts a block path or the name of any
    parameter inside it (as the original's per-parameter API did); a name
    outside every layer is always ``True``.

    Args:
        min_activity: lower bound of a layer's activity (``0 < x <= 1``).
        honest_check_every: every this many updates, every layer computes its backward.
        activity_decay: smoothing of heat, stability and activity.
        warmup_steps: updates during which every layer computes its backward.
        seed: seed of the decisions.
        layers: explicit module paths/patterns of the layers.
        history_dtype: dtype of the gradient history, ``"float32"`` or ``"bfloat16"``
            (half the bytes; see ``docs/configuration.md``).

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
        >>> t = ALASTracker(min_activity=0.3, honest_check_every=20)
        >>> t.initialize(m)
        >>> t.should_compute_backward("0.1.weight")
        True
    """

    def __init__(self, min_activity: float = 0.3, honest_check_every: int = 20, activity_decay: float = 0.95, *,
                 warmup_steps: int = 0, seed: int = 0, layers: Optional[Sequence[str]] = None,
                 max_consecutive_skips: int = 5, history_dtype: str = "float32") -> None:
        # validation shares FlashConfig's rules and messages
        self.config = FlashConfig.for_arguments(
            "ALASTracker", {}, min_activity=min_activity, honest_check_every=honest_check_every,
            activity_decay=activity_decay, warmup_steps=warmup_steps, seed=seed,
            layers=tuple(layers) if isinstance(layers, list) else layers, max_consecutive_skips=max_consecutive_skips,
            history_dtype=history_dtype)
        self.state: Optional[ALASState] = None
        self.lmap: Optional[LayerMap] = None
        self.decision: Optional[torch.Tensor] = None
        self._params: Dict[str, nn.Parameter] = {}

    def _require(self) -> ALASState:
        if self.state is None:
            raise RuntimeError("ALASTracker: call initialize(model) first")
        return self.state

    def initialize(self, model: nn.Module) -> None:
        """Find the model's layers and start a fresh state (every layer fully active)."""
        self.lmap = find_layers(model, self.config.layers)
        self._params = dict(model.named_parameters())
        self.state = alas_init(tuple(tuple(self._params[n] for n in names) for names in self.lmap.params),
                               history_dtype=history_dtype_of(self.config.history_dtype))
        self.decision = self._decide()

    def _decide(self) -> torch.Tensor:
        s = self._require()
        c = self.config
        step = int(s.step)
        honest = step < c.warmup_steps or (step - c.warmup_steps) % c.honest_check_every == 0
        return should_backward(s, honest=honest, seed=c.seed, max_consecutive_skips=c.max_consecutive_skips)

    def update_metrics(self, model: nn.Module) -> None:
        """Fold the current ``.grad`` of every layer in, then decide the next step.

        A layer whose grads are all ``None`` counts as skipped.
        """
        s = self._require()
        params = dict(model.named_parameters())
        grads = []
        for names in self.lmap.params:
            gs = [params[n].grad for n in names]
            grads.append(None if all(g is None for g in gs) else
                         tuple(torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, gs)))
        c = self.config
        self.state = alas_update(s, tuple(grads), tuple(tuple(params[n].detach() for n in names)
                                                      for names in self.lmap.params),
                                 min_activity=c.min_activity, activity_decay=c.activity_decay,
                                 interp_decay=c.interp_decay, trend_weight=c.trend_weight)
        self.decision = self._decide()

    def should_compute_backward(self, layer_name: str) -> bool:
        """Whether the layer holding ``layer_name`` computes its real backward on the next step."""
        self._require()
        i = self.lmap.layer_of(layer_name)
        if i is None:
            if layer_name not in self._params:
                raise KeyError(f"ALASTracker: {layer_name!r} is neither a layer nor a parameter of the model")
            return True
        return bool(self.decision[i])

    def get_stats(self) -> Dict[str, Any]:
        """Per-layer heat, stability, activity and fidelity, and the memory of the history."""
        s = self._require()
        return {
            "layers": list(self.lmap.names),
            "steps": int(s.step),
            "heat": s.heat.tolist(),
            "stability": s.stability.tolist(),
            "activity": s.activity.tolist(),
            "fidelity": s.fidelity.tolist(),
            "mean_activity": float(s.activity.mean()) if s.activity.numel() else None,
            "next_backward": [bool(x) for x in self.decision],
            "history_bytes": state_nbytes(s),
        }
