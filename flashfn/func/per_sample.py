"""Per-sample losses and gradients through ``torch.func``."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

Tensor = torch.Tensor

__all__ = ["per_sample_grads", "per_sample_losses", "token_losses_per_sample"]


def per_sample_grads(
    model: nn.Module,
    params: Dict[str, Tensor],
    buffers: Dict[str, Tensor],
    loss_fn: Callable[[Any, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: Optional[int] = None,
    randomness: str = "error",
) -> Dict[str, Tensor]:
    """Gradient of ``loss_fn(model(x_i), y_i)`` for every sample ``i``, with ``vmap(grad(...))``.

    Args:
        model: the model (called through ``functional_call``).
        params: ``{name: tensor}`` to differentiate (detached copies are taken).
        buffers: ``{name: tensor}`` passed unchanged.
        loss_fn: ``loss_fn(output, target) -> scalar`` for *one* sample (the
            sample is given with a batch dimension of 1).
        inputs: ``[N, ...]`` inputs.
        targets: ``[N, ...]`` targets.
        chunk_size: ``vmap`` chunk size (memory against speed).
        randomness: ``vmap``'s ``randomness`` (``"error"``, ``"different"``, ``"same"``).

    Returns:
        ``{name: [N, *shape]}`` per-sample gradients.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(3, 1)
        >>> p = {k: v.detach() for k, v in m.named_parameters()}
        >>> g = per_sample_grads(m, p, {}, lambda o, y: ((o - y) ** 2).sum(), torch.randn(4, 3), torch.randn(4, 1))
        >>> g["weight"].shape
        torch.Size([4, 1, 3])
    """
    detached = {k: v.detach() for k, v in params.items()}

    def one(p: Dict[str, Tensor], b: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, b), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, None, 0, 0), randomness=randomness, chunk_size=chunk_size)(
        detached, buffers, inputs, targets
    )


def per_sample_losses(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of each sample (``[N, C]`` or ``[N, T, C]`` logits), ignored targets left out.

    A sample with no counted target gets loss 0.
    """
    total, count = token_losses_per_sample(logits, labels, ignore_index=ignore_index)
    return total / count.clamp_min(1)


def token_losses_per_sample(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per sample: the *sum* of its cross-entropy terms and how many targets count.

    ``logits`` is ``[N, C]`` (one target per sample) or ``[N, T, C]`` (one per
    position); ``labels`` is ``[N]`` or ``[N, T]``. Computed in float32.
    """
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
        labels = labels.unsqueeze(1)
    n, t, c = logits.shape
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(n * t, c).float(), labels.reshape(n * t), ignore_index=ignore_index, reduction="none"
    ).reshape(n, t)
    count = (labels != ignore_index).sum(dim=1)
    return flat.sum(dim=1), count
