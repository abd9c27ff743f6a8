"""Tiny Hugging Face models built from configs (offline, no dropout) for the ``flashfn.func`` tests."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.func import functional_call

VOCAB = 64
WIDTH = 32
SEQ = 12

Tensor = torch.Tensor


def tiny_gpt2(n_layer: int = 4, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """A ``GPT2LMHeadModel`` (``lm_head`` tied to ``wte``), width 32, all dropout 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     attn_implementation=attn)
    return GPT2LMHeadModel(cfg)


def _bert_config(n_layer: int = 3, **kw):
    from transformers import BertConfig

    return BertConfig(num_hidden_layers=n_layer, hidden_size=WIDTH, num_attention_heads=2, intermediate_size=64,
                      vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, classifier_dropout=0.0, **kw)


def tiny_bert_cls(num_labels: int = 3, n_layer: int = 3, seed: int = 0, **kw) -> nn.Module:
    """A ``BertForSequenceClassification``."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(_bert_config(n_layer, num_labels=num_labels, **kw))


def tiny_bert_mlm(n_layer: int = 3, seed: int = 0) -> nn.Module:
    """A ``BertForMaskedLM``."""
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(_bert_config(n_layer))


def tiny_bert_tok(num_labels: int = 5, n_layer: int = 3, seed: int = 0) -> nn.Module:
    """A ``BertForTokenClassification``."""
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    return BertForTokenClassification(_bert_config(n_layer, num_labels=num_labels))


def _llama_config(n_layer: int = 3, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=n_layer, hidden_size=WIDTH, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, **kw)


def tiny_llama(n_layer: int = 3, seed: int = 0) -> nn.Module:
    """A ``LlamaForCausalLM``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(n_layer))


def tiny_llama_tok(num_labels: int = 5, seed: int = 0) -> nn.Module:
    """A ``LlamaForTokenClassification`` (its loss goes through ``loss_function``)."""
    from transformers import LlamaForTokenClassification

    torch.manual_seed(seed)
    return LlamaForTokenClassification(_llama_config(2, num_labels=num_labels, classifier_dropout=0.0))


def tiny_llama_cls(num_labels: int = 3, seed: int = 0) -> nn.Module:
    """A ``LlamaForSequenceClassification`` (its loss goes through ``loss_function``)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(_llama_config(2, num_labels=num_labels))


def token_batch(n: int = 4, seq: int = SEQ, seed: int = 1, low: int = 1) -> Tensor:
    """``[n, seq]`` random token ids in ``[low, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (n, seq), generator=g)


def lm_per_sample_loss(model: nn.Module) -> Callable[[Dict[str, Tensor], Dict[str, Tensor], Tensor], Tensor]:
    """``per_sample_loss(params, buffers, ids) -> [N]``: next-token cross-entropy of each sequence (mean over tokens).

    Written here with ``torch.nn.functional`` only, independently of ``flashfn``.
    """

    def per_sample_loss(params: Dict[str, Tensor], buffers: Dict[str, Tensor], ids: Tensor) -> Tensor:
        logits = functional_call(model, (params, buffers), (ids,)).logits[:, :-1]
        n, t, c = logits.shape
        terms = nn.functional.cross_entropy(logits.reshape(n * t, c), ids[:, 1:].reshape(n * t), reduction="none")
        return terms.reshape(n, t).mean(dim=1)

    return per_sample_loss


def detached(model: nn.Module) -> Dict[str, Tensor]:
    """``{name: parameter.detach()}``."""
    return {k: v.detach() for k, v in model.named_parameters()}
