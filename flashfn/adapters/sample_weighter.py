"""``SampleWeighter``: the specification's stateful sample weighting over :mod:`flashfn.core.weighting`."""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..config import FlashConfig
from ..core.weighting import WeightingState, weigh_samples, weighting_init, weighting_update

__all__ = ["SampleWeighter"]


class SampleWeighter:
    """Lowers the weight of samples with a low loss.

    Functional twin: :func:`flashfn.core.weighting.weigh_samples` (this class
    adds the running statistics).

    Args:
        min_weight: weight of a sample with loss 0, in ``(0, 1]``.
        low_loss_threshold: losses at or above it keep weight 1.

    Example:
        >>> import torch
        >>> w = SampleWeighter(min_weight=0.3, low_loss_threshold=0.5)
        >>> w.compute_weights(torch.tensor([0.0, 1.0])).tolist()
        [0.30000001192092896, 1.0]
    """

    def __init__(self, min_weight: float = 0.3, low_loss_threshold: float = 0.5) -> None:
        cfg = FlashConfig.for_arguments("SampleWeighter", {"min_weight": "min_sample_weight"},
                                        min_weight=min_weight, low_loss_threshold=low_loss_threshold)
        self.min_weight = cfg.min_sample_weight
        self.low_loss_threshold = cfg.low_loss_threshold
        self.state: WeightingState = weighting_init()

    def compute_weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Weights in ``[min_weight, 1]`` for per-sample ``losses`` (recorded in the statistics)."""
        if not isinstance(losses, torch.Tensor):
            raise TypeError(f"SampleWeighter.compute_weights: losses must be a tensor, got {type(losses).__name__}")
        w = weigh_samples(losses, min_weight=self.min_weight, low_loss_threshold=self.low_loss_threshold)
        self.state = weighting_update(self.state, w)
        return w

    def get_stats(self) -> Dict[str, Any]:
        """Samples weighed, mean weight applied and how many were down-weighted."""
        n = int(self.state.count)
        return {
            "samples": n,
            "avg_weight": float(self.state.weight_sum) / n if n else None,
            "down_weighted": int(self.state.low_count),
            "down_weighted_share": int(self.state.low_count) / n if n else None,
        }
