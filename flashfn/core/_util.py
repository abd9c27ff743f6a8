"""Small pure helpers shared by the core modules: explicit randomness and tree reductions."""

from __future__ import annotations

from typing import Any, Optional

import optree
import torch

Tensor = torch.Tensor

_MASK = (1 << 63) - 1


def generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, stream)`` only.

    Identical arguments give an identical generator on every process, which is
    what makes every random decision of Flash Mode reproducible and agree across
    the ranks of a distributed run.
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB) & _MASK
    return torch.Generator(device="cpu").manual_seed(mixed)


def uniform(seed: int, step: int, stream: int, n: int) -> Tensor:
    """``n`` uniform draws in ``[0, 1)`` fixed by ``(seed, step, stream)``."""
    return torch.rand(n, generator=generator(seed, step, stream), dtype=torch.float64)


def tree_dot(a: Any, b: Any) -> Tensor:
    """Sum over leaves of ``<a, b>`` in float64."""
    parts = optree.tree_leaves(optree.tree_map(lambda x, y: (x.double() * y.double()).sum(), a, b))
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float64)


def tree_cosine(a: Any, b: Any, eps: float = 1e-30) -> Tensor:
    """Cosine similarity between two pytrees of tensors, as if flattened into one vector."""
    na = tree_dot(a, a).sqrt()
    nb = tree_dot(b, b).sqrt()
    return tree_dot(a, b) / (na * nb).clamp_min(eps)


def tree_all_finite(tree: Any) -> bool:
    """Whether every leaf of ``tree`` is finite."""
    return all(bool(torch.isfinite(x).all()) for x in optree.tree_leaves(tree))


def tree_zeros_like(tree: Any, dtype: Optional[torch.dtype] = None) -> Any:
    """Zeros shaped like ``tree`` (optionally in ``dtype``)."""
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ema(old: Tensor, new: Tensor, decay: float) -> Tensor:
    """``decay * old + (1 - decay) * new`` without touching either input."""
    return old * decay + new * (1.0 - decay)
