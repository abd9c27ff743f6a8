"""Per-sample losses for the standard Hugging Face heads, normalised exactly as the model's own loss.

Supported heads (by class name and config):

- causal LM (``*ForCausalLM``, ``*LMHeadModel``): token cross-entropy with the
  labels shifted by one, ``-100`` ignored;
- masked LM (``*ForMaskedLM``) and token classification
  (``*ForTokenClassification``): token cross-entropy, ``-100`` ignored;
- sequence classification (``*ForSequenceClassification``) with
  ``num_labels > 1`` and single-label targets: cross-entropy per sample.

The model's loss is ``sum(token terms) / N`` with ``N`` the number of counted
targets in the batch, or, for models whose loss honours it (causal LMs in
``transformers`` 5, not BERT's heads), the ``num_items_in_batch`` the Trainer
passes under gradient accumulation. :func:`honours_num_items` finds out which
by asking the model once; :func:`weighted_head_loss` keeps the model's ``N``
so that unit weights give the model's own loss.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import nn

from .per_sample import token_losses_per_sample

Tensor = torch.Tensor

__all__ = ["head_kind", "honours_num_items", "per_sample_head_terms", "weighted_head_loss"]


def head_kind(model: nn.Module) -> Optional[str]:
    """``"causal"``, ``"token"`` or ``"sequence"`` for a supported head, else ``None``."""
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    if name.endswith("ForMaskedLM") or name.endswith("ForTokenClassification"):
        return "token"
    if name.endswith("ForSequenceClassification"):
        num_labels = getattr(cfg, "num_labels", 2)
        problem = getattr(cfg, "problem_type", None)
        if num_labels > 1 and problem in (None, "single_label_classification"):
            return "sequence"
    return None


def per_sample_head_terms(kind: str, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """Per sample: the sum of its loss terms and its number of counted targets."""
    if kind == "causal":
        labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        return token_losses_per_sample(logits, labels)
    if kind == "token":
        return token_losses_per_sample(logits, labels)
    if kind == "sequence":
        if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError("sequence classification labels must be class indices of shape [batch]")
        return token_losses_per_sample(logits, labels.long())
    raise ValueError(f"unsupported head kind {kind!r}")


def weighted_head_loss(
    kind: str,
    logits: Tensor,
    labels: Tensor,
    weights_fn: Any = None,
    num_items_in_batch: Optional[Any] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The head's loss with per-sample weights.

    Args:
        kind: from :func:`head_kind`.
        logits: the model's logits.
        labels: the labels given to the model.
        weights_fn: ``weights_fn(per_sample_losses) -> weights``, or ``None`` for the plain loss.
        num_items_in_batch: the Trainer's normaliser under gradient accumulation, if any.

    Returns:
        ``(loss, per_sample_losses, weights)``: the (weighted) loss normalised
        like the model's own, the detached per-sample mean losses, and the
        weights applied (``None`` without ``weights_fn``).
    """
    sums, counts = per_sample_head_terms(kind, logits, labels)
    n = counts.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(n, Tensor):
        n = n.to(sums.device)
    per_sample = (sums.detach() / counts.clamp_min(1)).detach()
    if weights_fn is None:
        return sums.sum() / n, per_sample, None
    w = weights_fn(per_sample).to(sums.dtype)
    # a sample without counted targets keeps weight 1 (it contributes nothing either way)
    w = torch.where(counts > 0, w, torch.ones_like(w))
    return (w * sums).sum() / n, per_sample, w[counts > 0]


def honours_num_items(model: nn.Module, kind: str, args: tuple, kwargs: dict, num_items_in_batch: Any,
                      forward: Any = None) -> Optional[bool]:
    """Whether ``model``'s own loss divides by ``num_items_in_batch`` (``True``) or by its own count (``False``).

    Runs the model's forward once in eval mode without autograd (no dropout, no
    random numbers drawn) with the labels and ``num_items_in_batch`` in
    ``kwargs``, and compares its loss with both normalisations of the same
    logits. ``None`` when neither matches (the loss is not one this module can
    split; sample weighting must stay off).
    """
    forward = forward or model.forward
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward(*args, **{**kwargs, "num_items_in_batch": num_items_in_batch})
    finally:
        model.train(was_training)
    loss = out.get("loss") if isinstance(out, dict) else None
    if loss is None or out.get("logits") is None:
        return None
    sums, counts = per_sample_head_terms(kind, out["logits"], kwargs["labels"])
    n_items = torch.as_tensor(num_items_in_batch, dtype=sums.dtype, device=sums.device)
    for answer, n in ((True, n_items), (False, counts.sum().to(sums.dtype))):
        if torch.allclose(sums.sum() / n, loss.float(), rtol=1e-4, atol=1e-6):
            return answer
    return None
