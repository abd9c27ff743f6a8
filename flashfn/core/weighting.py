"""Loss-based sample weighting: pure functions.

A sample whose loss is under ``low_loss_threshold`` is treated as already
learned and its weight is lowered linearly with its loss, down to
``min_weight`` at loss 0; samples at or above the threshold keep weight 1::

    w_i = 1                                             if loss_i >= low_loss_threshold
    w_i = min_weight + (1 - min_weight) * loss_i / low_loss_threshold   otherwise

**Normalisation.** The weighted loss is ``sum_i w_i * loss_i / N`` where ``N``
is the *plain* normaliser (the batch size, or the number of target tokens the
run would divide by, e.g. the Trainer's ``num_items_in_batch``), not
``sum_i w_i``. So unit weights reproduce the plain loss exactly (also under
gradient accumulation and across processes, where ``sum_i w_i`` of one
micro-batch is not known to the others), and a down-weighted sample only ever
*removes* gradient signal: the high-loss samples are never scaled up.

Reference: Selective Backprop (Jiang et al., 2019) and InfoBatch (Qin et al.,
ICLR 2024) weigh or prune samples by their loss.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

Tensor = torch.Tensor

__all__ = ["WeightingState", "weigh_samples", "weighted_loss", "weighting_init", "weighting_update"]


def weigh_samples(losses: Tensor, *, min_weight: float = 0.3, low_loss_threshold: float = 0.5) -> Tensor:
    """Per-sample weights in ``[min_weight, 1]`` from per-sample losses.

    Args:
        losses: per-sample losses, any shape; read detached (no gradient flows
            through the weights). A non-finite loss gets weight 1 (the sample
            is treated as plain training would treat it).
        min_weight: the weight of a sample with loss 0, in ``(0, 1]``.
        low_loss_threshold: losses at or above it get weight 1.

    Returns:
        float32 weights, same shape as ``losses``.

    Example:
        >>> import torch
        >>> [round(w, 4) for w in weigh_samples(torch.tensor([0.0, 0.25, 2.0])).tolist()]
        [0.3, 0.65, 1.0]
    """
    if not 0.0 < min_weight <= 1.0:
        raise ValueError(f"min_weight must be in (0, 1], got {min_weight!r}")
    if not low_loss_threshold > 0.0:
        raise ValueError(f"low_loss_threshold must be > 0, got {low_loss_threshold!r}")
    x = losses.detach().float()
    ramp = min_weight + (1.0 - min_weight) * (x.clamp_min(0.0) / low_loss_threshold)
    w = torch.where(x < low_loss_threshold, ramp, torch.ones_like(x))
    return torch.where(torch.isfinite(x), w.clamp(min_weight, 1.0), torch.ones_like(x))


def weighted_loss(losses: Tensor, weights: Tensor, normaliser: Optional[float | Tensor] = None) -> Tensor:
    """``sum(weights * losses) / normaliser`` (``normaliser`` defaults to ``losses.numel()``).

    Gradients flow through ``losses`` only.
    """
    n = losses.numel() if normaliser is None else normaliser
    return (weights.detach().to(losses.dtype) * losses).sum() / n


class WeightingState(NamedTuple):
    """Running statistics of the weights applied."""

    count: Tensor  # int64, samples weighed
    weight_sum: Tensor  # float64
    low_count: Tensor  # int64, samples with weight < 1


def weighting_init() -> WeightingState:
    """Empty statistics."""
    return WeightingState(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.float64),
                          torch.zeros((), dtype=torch.int64))


def weighting_update(state: WeightingState, weights: Tensor) -> WeightingState:
    """Fold the weights applied on one batch into the statistics (non-finite ones are ignored)."""
    w = weights.detach().double().flatten()
    w = w[torch.isfinite(w)]
    return WeightingState(state.count + w.numel(), state.weight_sum + w.sum(), state.low_count + (w < 1).sum())
