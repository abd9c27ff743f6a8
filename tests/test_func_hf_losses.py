"""Tests for ``flashfn.func.hf_losses``: per-sample head losses normalised exactly like the model's own loss."""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import pytest
import torch
from helpers_models import (
    VOCAB,
    tiny_bert_cls,
    tiny_bert_mlm,
    tiny_bert_tok,
    tiny_gpt2,
    tiny_llama,
    tiny_llama_cls,
    tiny_llama_tok,
    token_batch,
)
from torch import nn

from flashfn.func.hf_losses import head_kind, honours_num_items, weighted_head_loss

N, SEQ = 4, 10


def _lm_labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, -3:] = -100  # right padding
    labels[2, :4] = -100  # a masked prompt
    return labels


def _mlm_labels(ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(ids.shape, generator=g) < 0.3
    keep[1] = False  # a sample without any masked token
    keep[0, 0] = keep[2, 5] = keep[3, 9] = True
    return torch.where(keep, ids, torch.full_like(ids, -100))


def _tok_labels(ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 5, ids.shape, generator=g)
    labels[0, -2:] = -100
    labels[3, 0] = -100
    return labels


def _seq_labels(ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0, 2, 1, 2])


CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[torch.Tensor], torch.Tensor], str]] = {
    "gpt2-causal": (lambda: tiny_gpt2(n_layer=2), _lm_labels, "causal"),
    "llama-causal": (lambda: tiny_llama(n_layer=2), _lm_labels, "causal"),
    "bert-sequence": (lambda: tiny_bert_cls(num_labels=3, n_layer=2), _seq_labels, "sequence"),
    "llama-sequence": (lambda: tiny_llama_cls(num_labels=3), _seq_labels, "sequence"),
    "bert-masked-lm": (lambda: tiny_bert_mlm(n_layer=2), _mlm_labels, "token"),
    "bert-token": (lambda: tiny_bert_tok(num_labels=5, n_layer=2), _tok_labels, "token"),
    "llama-token": (lambda: tiny_llama_tok(num_labels=5), _tok_labels, "token"),
}


def _counted(kind: str, labels: torch.Tensor) -> int:
    """How many targets the model's own loss averages over (written out independently)."""
    if kind == "causal":
        return int((labels[:, 1:] != -100).sum())
    return int((labels != -100).sum())


@pytest.mark.parametrize("case", list(CASES))
def test_head_kind(case: str) -> None:
    make, _, kind = CASES[case]
    assert head_kind(make()) == kind


@pytest.mark.parametrize("case", list(CASES))
def test_unit_weights_give_the_models_own_loss(case: str) -> None:
    make, make_labels, kind = CASES[case]
    model = make()
    ids = token_batch(N, seq=SEQ, low=3)
    labels = make_labels(ids)
    out = model(ids, labels=labels)
    loss, per_sample, w = weighted_head_loss(kind, out.logits, labels, None)
    assert w is None
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    assert per_sample.shape == (N,) and not per_sample.requires_grad
    ones, _, w1 = weighted_head_loss(kind, out.logits, labels, lambda x: torch.ones_like(x))
    torch.testing.assert_close(ones, out.loss, rtol=1e-5, atol=1e-5)
    assert w1 is not None and bool((w1 == 1).all())
    # the loss is differentiable like the model's: same gradient on the logits
    (g_ours,) = torch.autograd.grad(loss, out.logits, retain_graph=True)
    (g_model,) = torch.autograd.grad(out.loss, out.logits)
    torch.testing.assert_close(g_ours, g_model, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_num_items_in_batch_gives_the_models_own_loss(case: str) -> None:
    # under gradient accumulation the Trainer passes num_items_in_batch (the count over all micro-batches)
    make, make_labels, kind = CASES[case]
    model = make()
    ids = token_batch(N, seq=SEQ, low=3)
    labels = make_labels(ids)
    n_items = torch.tensor(3 * _counted(kind, labels) + 1)
    own = model(ids, labels=labels, num_items_in_batch=n_items)
    # some heads (causal LMs) divide by num_items_in_batch, others (BERT's) ignore it: the probe tells which
    honours = honours_num_items(model, kind, (ids,), {"labels": labels}, n_items)
    assert honours is not None
    loss, _, _ = weighted_head_loss(kind, own.logits, labels, None, num_items_in_batch=n_items if honours else None)
    torch.testing.assert_close(loss, own.loss, rtol=1e-5, atol=1e-5)
    if kind == "causal":
        assert honours is True


@pytest.mark.parametrize("case", ["gpt2-causal", "bert-masked-lm", "bert-sequence"])
def test_weighted_loss_terms(case: str) -> None:
    make, make_labels, kind = CASES[case]
    model = make()
    ids = token_batch(N, seq=SEQ, low=3)
    labels = make_labels(ids)
    logits = model(ids).logits.detach()
    weights = torch.tensor([0.3, 0.5, 1.0, 0.8])
    loss, per_sample, w = weighted_head_loss(kind, logits, labels, lambda x: weights[: x.numel()])
    # independent: per sample, the cross-entropy terms it counts
    if kind == "causal":
        lg, lb = logits[:, :-1], labels[:, 1:]
    elif kind == "sequence":
        lg, lb = logits.unsqueeze(1), labels.unsqueeze(1)
    else:
        lg, lb = logits, labels
    sums, counts = [], []
    for i in range(N):
        keep = lb[i] != -100
        terms = nn.functional.cross_entropy(lg[i][keep].float(), lb[i][keep], reduction="sum")
        sums.append(terms if keep.any() else torch.tensor(0.0))
        counts.append(int(keep.sum()))
    sums_t, counts_t = torch.stack(sums), torch.tensor(counts)
    torch.testing.assert_close(per_sample, sums_t / counts_t.clamp_min(1), rtol=1e-5, atol=1e-6)
    w_eff = torch.where(counts_t > 0, weights, torch.ones(N))  # a sample with nothing to count keeps weight 1
    torch.testing.assert_close(loss, (w_eff * sums_t).sum() / counts_t.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_eff[counts_t > 0])


# --------------------------------------------------------------------------- #
# head_kind: what is not supported
# --------------------------------------------------------------------------- #


def test_head_kind_regression_head_is_none() -> None:
    assert head_kind(tiny_bert_cls(num_labels=1, n_layer=1)) is None


def test_head_kind_multi_label_is_none() -> None:
    assert head_kind(tiny_bert_cls(num_labels=3, n_layer=1, problem_type="multi_label_classification")) is None


def test_head_kind_non_hf_module_is_none() -> None:
    assert head_kind(nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))) is None
    assert head_kind(nn.Linear(3, 3)) is None


def test_sequence_labels_must_be_class_indices() -> None:
    logits = torch.randn(N, 3)
    with pytest.raises(ValueError, match="class indices"):
        weighted_head_loss("sequence", logits, torch.rand(N, 3), None)


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="regression"):
        weighted_head_loss("regression", torch.randn(N, 1), torch.randn(N), None)
