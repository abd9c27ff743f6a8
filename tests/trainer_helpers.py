"""Shared builders for the Trainer tests: a tiny GPT-2, the embedded byte corpus and short CPU Trainer runs.

Everything here is small on purpose (4 blocks of width 32, sequences of 32
bytes, batches of 8) so that a 200-step run takes a few seconds on one CPU
thread. The helpers build nothing that the code under test provides: they
only assemble ``transformers`` objects and record what happened.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

torch.set_num_threads(1)

# The specification's import path ``transformers.flash_mode`` needs the alias finder: installed by the
# wheel's ``.pth``, or importable from ``flashfn/_alias`` in a source checkout.
if importlib.util.find_spec("flashfn_alias") is None:  # pragma: no cover - depends on how the tests are run
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flashfn", "_alias"))
import flashfn_alias  # noqa: E402,F401
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from flashfn.data import ByteLMDataset, byte_splits, load_corpus  # noqa: E402

SEQ_LEN = 32
BATCH = 8

__all__ = [
    "BATCH",
    "SEQ_LEN",
    "DictLM",
    "StepRecorder",
    "assert_tree_equal",
    "byte_dataset",
    "make_args",
    "make_trainer",
    "optimizer_state_copy",
    "params_of",
    "run",
    "tiny_gpt2",
]


@functools.lru_cache(maxsize=1)
def _train_tokens() -> torch.Tensor:
    train, _ = byte_splits(load_corpus())
    return train


def byte_dataset(num_samples: int, seq_len: int = SEQ_LEN, seed: int = 0) -> ByteLMDataset:
    """Windows of the embedded Shakespeare corpus (``{"input_ids", "labels"}``)."""
    return ByteLMDataset(_train_tokens(), seq_len=seq_len, num_samples=num_samples, seed=seed)


def tiny_gpt2(seed: int = 0, *, n_layer: int = 4, n_embd: int = 32, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A freshly initialised byte-level GPT-2 (``vocab_size=256``), identical for an identical ``seed``."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=256, n_positions=SEQ_LEN,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


class DictLM(nn.Module):
    """A model without repeated blocks and without a Hugging Face head: returns ``{"loss", "logits"}``."""

    def __init__(self, vocab: int = 256, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs: Any) -> dict:
        logits = self.out(torch.tanh(self.mix(self.emb(input_ids))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                      labels[:, 1:].reshape(-1))
        return out


def make_args(out_dir: str, max_steps: int, **overrides: Any) -> TrainingArguments:
    """CPU ``TrainingArguments`` for a short, deterministic, silent run."""
    kw: Dict[str, Any] = dict(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=3e-3,
        report_to=[], logging_steps=max(max_steps, 1), save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def make_trainer(model: nn.Module, out_dir: str, max_steps: int, callbacks: Sequence[Any] = (),
                 dataset: Any = None, **overrides: Any) -> Trainer:
    """A ``Trainer`` over the byte corpus (enough samples for ``max_steps`` optimizer steps)."""
    args = make_args(out_dir, max_steps, **overrides)
    if dataset is None:
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        dataset = byte_dataset(per_step * max_steps)
    return Trainer(model=model, args=args, train_dataset=dataset, callbacks=list(callbacks))


def run(out_dir: str, max_steps: int, callbacks: Sequence[Any] = (), *, model: Optional[nn.Module] = None,
        **overrides: Any) -> Trainer:
    """Train a fresh tiny GPT-2 (seed 0) for ``max_steps`` and return the trainer."""
    model = tiny_gpt2() if model is None else model
    trainer = make_trainer(model, out_dir, max_steps, callbacks, **overrides)
    trainer.train()
    return trainer


def params_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached copies of every parameter."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class StepRecorder(TrainerCallback):
    """Records, per optimizer step, the learning-rate schedule and (optionally) the gradients the optimizer sees.

    Place it *after* ``FlashModeCallback`` in ``callbacks``: its
    ``on_pre_optimizer_step`` then sees the gradients exactly as
    ``optimizer.step()`` will.
    """

    def __init__(self, grads: bool = False) -> None:
        self.grads = grads
        self.lr: List[List[float]] = []
        self.last_epoch: List[int] = []
        self.seen_grads: List[Dict[str, Optional[torch.Tensor]]] = []
        self.opt_steps: List[int] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if self.grads:
            self.seen_grads.append({n: None if p.grad is None else p.grad.detach().clone()
                                    for n, p in model.named_parameters()})

    def on_step_end(self, args: Any, state: Any, control: Any, lr_scheduler: Any = None, optimizer: Any = None,
                    **kwargs: Any):
        self.lr.append(list(lr_scheduler.get_last_lr()))
        self.last_epoch.append(int(lr_scheduler.last_epoch))
        inner = getattr(optimizer, "optimizer", optimizer)
        steps = [int(s["step"]) for s in inner.state.values() if "step" in s]
        self.opt_steps.append(max(steps) if steps else 0)


def optimizer_state_copy(optimizer: Any) -> dict:
    """A deep copy of an (inner) optimizer's ``state_dict``."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return copy.deepcopy(inner.state_dict())


def assert_tree_equal(a: Any, b: Any, path: str = "") -> None:
    """``torch.equal`` on every tensor of two nested dicts/lists, ``==`` on everything else."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {path or '<root>'}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {path or '<root>'}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"lengths differ at {path or '<root>'}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {path or '<root>'}"
