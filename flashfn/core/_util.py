"""Small pure helpers shared by the core modules: explicit randomness and tree reductions."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

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
    """Sum over leaves of ``<a, b>`` (per-leaf dot products in the leaves' dtype, summed in float64)."""
    xs, ys = optree.tree_leaves(a), optree.tree_leaves(b)
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1).to(x.dtype)) for x, y in zip(xs, ys)]).double().sum()


def tree_norm(a: Any) -> Tensor:
    """Euclidean norm of a pytree of tensors as one vector, float64 (non-finite if any leaf is)."""
    xs = optree.tree_leaves(a)
    if not xs:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(torch._foreach_norm(xs)).double().norm()


def tree_cosine(a: Any, b: Any, eps: float = 1e-30) -> Tensor:
    """Cosine similarity between two pytrees of tensors, as if flattened into one vector."""
    return tree_dot(a, b) / (tree_norm(a) * tree_norm(b)).clamp_min(eps)


def ema(old: Tensor, new: Tensor, decay: float) -> Tensor:
    """``decay * old + (1 - decay) * new`` without touching either input."""
    return old * decay + new * (1.0 - decay)


def flatten(tensors: Sequence[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """One flat (new) vector of ``tensors`` in order, optionally cast to ``dtype``."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]) if len(tensors) else torch.zeros(0)
    return flat.to(dtype) if dtype is not None else flat


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """Split a flat vector back into tensors shaped (and typed) like ``like``."""
    parts = torch.split(flat, [t.numel() for t in like])
    return tuple(p.reshape(t.shape).to(t.dtype) for p, t in zip(parts, like))
