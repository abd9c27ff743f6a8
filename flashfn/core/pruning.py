"""Sample pruning that saves work (InfoBatch): drop well-learned samples *before* the forward pass.

Re-weighting a loss (:mod:`flashfn.core.weighting`) cannot make a step
cheaper. Pruning can: a loop that knows which samples it is about to train on
remembers each sample's last loss (free: the forward pass computes it) and,
before the next forward, drops some of the samples it remembers as well
learned. Following InfoBatch (Qin et al., ICLR 2024, arXiv 2303.04947):

- a sample is *well learned* when its remembered loss is below the mean of
  every remembered loss; a sample never seen is not;
- each well-learned sample is dropped with probability ``prune_ratio`` (drawn
  from ``(seed, step)`` only);
- the well-learned samples that are kept get weight ``1 / (1 - prune_ratio)``,
  so the expected gradient of the batch is unchanged (use the *original*
  batch size as the normaliser of :func:`~flashfn.core.weighting.weighted_loss`);
- InfoBatch stops pruning for the last 12.5% of training (annealing): the
  loop decides when, by not calling :func:`prune_samples` there.

Only a loop that can index its samples can use it (the ``torch.func`` loop
of ``flashfn bench``'s Fashion-MNIST workload does); the Trainer callback
cannot see sample identities and does not prune.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from ._util import uniform

Tensor = torch.Tensor

__all__ = ["LossMemory", "memory_init", "memory_update", "prune_samples"]

_STREAM_PRUNE = 3


class LossMemory(NamedTuple):
    """Each sample's last measured loss (NaN: never seen) and counts of what pruning did."""

    losses: Tensor  # [D] float32
    kept: Tensor  # int64, samples offered and trained on
    pruned: Tensor  # int64, samples offered and dropped


def memory_init(n_samples: int) -> LossMemory:
    """Nothing remembered for ``n_samples`` samples.

    Example:
        >>> memory_init(3).losses.isnan().all().item()
        True
    """
    if n_samples < 1:
        raise ValueError(f"memory_init: n_samples must be >= 1, got {n_samples!r}")
    z = torch.zeros((), dtype=torch.int64)
    return LossMemory(torch.full((int(n_samples),), float("nan")), z, z)


def memory_update(memory: LossMemory, index: Tensor, losses: Tensor) -> LossMemory:
    """Remember the losses just measured for the samples ``index`` (non-finite ones are not remembered).

    Example:
        >>> m = memory_update(memory_init(3), torch.tensor([2]), torch.tensor([0.5]))
        >>> m.losses.tolist()[2]
        0.5
    """
    losses = losses.detach().float().flatten()
    index = index.flatten()
    if index.numel() != losses.numel():
        raise ValueError(f"memory_update: {index.numel()} indices for {losses.numel()} losses")
    ok = torch.isfinite(losses)
    new = memory.losses.clone()
    new[index[ok]] = losses[ok]
    return memory._replace(losses=new)


def prune_samples(memory: LossMemory, index: Tensor, *, prune_ratio: float, seed: int = 0,
                  step: int = 0) -> Tuple[Tensor, Tensor, LossMemory]:
    """Which of the samples ``index`` to train on, and their weights.

    Args:
        memory: the remembered losses.
        index: the samples the loop is about to train on.
        prune_ratio: probability of dropping a well-learned sample, in ``[0, 1)``.
        seed, step: the draws come from ``(seed, step)`` only.

    Returns:
        ``(keep, weights, memory)``: a bool mask over ``index``, float32
        weights for the kept samples (``1 / (1 - prune_ratio)`` for kept
        well-learned ones, 1 otherwise), and the memory with its counts updated.

    Example:
        >>> m = memory_update(memory_init(4), torch.arange(4), torch.tensor([0.1, 0.2, 3.0, 4.0]))
        >>> keep, w, m = prune_samples(m, torch.arange(4), prune_ratio=0.5, seed=0, step=1)
        >>> keep[2:].tolist(), sorted(set(w.tolist()) - {1.0}) in ([], [2.0])
        ([True, True], True)
    """
    if not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_samples: prune_ratio must be in [0, 1), got {prune_ratio!r}")
    remembered = memory.losses[index.flatten()]
    seen = torch.isfinite(memory.losses)
    threshold = memory.losses[seen].mean() if bool(seen.any()) else torch.tensor(float("nan"))
    low = torch.isfinite(remembered) & (remembered < threshold)
    u = uniform(seed, int(step), _STREAM_PRUNE, remembered.numel())
    drop = low & (u.double() < prune_ratio)
    keep = ~drop
    weights = torch.where(low, torch.full_like(remembered, 1.0 / (1.0 - prune_ratio)), torch.ones_like(remembered))
    memory = memory._replace(kept=memory.kept + int(keep.sum()), pruned=memory.pruned + int(drop.sum()))
    return keep, weights[keep], memory
