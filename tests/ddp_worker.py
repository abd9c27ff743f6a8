"""One process of the 2-process data-parallel run of ``tests/test_ddp.py`` (launched by ``torchrun``).

Trains the tiny GPT-2 of ``trainer_helpers`` through the Trainer (gloo, CPU)
with every Flash Mode component on, and writes to ``<out>/rank<r>.json``:
the hash of its parameters and of Flash Mode's whole state, the plan of every
step (and whether the skipped blocks were left without a gradient), Flash
Mode's counters, the losses this process saw before they were shared, and
what a Trainer built with ``ddp_find_unused_parameters=False`` did.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import optree
import torch
from trainer_helpers import BATCH, byte_dataset, make_trainer, tiny_gpt2
from transformers import TrainerCallback

from flashfn import FlashConfig, FlashModeCallback

STEPS = 60
ACCUM = 2
DEFAULTS_STEPS = 24
DEFAULTS_CFG = FlashConfig(warmup_steps=4, honest_check_every=2, step_back_after=3, verbose=False)
CFG = FlashConfig(warmup_steps=4, honest_check_every=6, activity_decay=0.5, coherence_threshold=-1.0,
                  max_virtual_steps=1, gca_checkpoint_every=3, low_loss_threshold=10.0, verbose=False,
                  predictor="ema", min_fidelity=0.0, step_back_after=0)  # every component acts, whatever it measures


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Probe(TrainerCallback):
    """Placed before ``FlashModeCallback``: records each step's plan and the losses this process saw."""

    def __init__(self, flash: FlashModeCallback) -> None:
        self.flash = flash
        self.plans: list = []
        self.local_losses: list = []
        self.skipped_grads: list = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        plan = self.flash._plan
        self.plans.append([plan.active, plan.weigh, list(plan.skipped)])
        self.local_losses.append(float(torch.cat(self.flash._step_losses).mean()))
        # what DDP left in the skipped blocks' gradients (the callback fills them after this)
        params = self.flash._params
        self.skipped_grads.append([params[n].grad is None for i in plan.skipped for n in self.flash.lmap.params[i]])


def main(out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    flash = FlashModeCallback(CFG, verbose=False)
    probe = Probe(flash)
    model = tiny_gpt2()
    # two global batches' worth of windows, shared out by the Trainer's sampler: successive gradients are alike
    data = byte_dataset(BATCH * ACCUM * 2 * 2)
    trainer = make_trainer(model, os.path.join(out_dir, "run"), STEPS, [probe, flash], dataset=data,
                           gradient_accumulation_steps=ACCUM, ddp_backend="gloo", max_grad_norm=1.0, learning_rate=1e-3)
    trainer.train()
    s = flash.state
    result = {
        "rank": rank,
        "world_size": torch.distributed.get_world_size(),
        "ddp": type(trainer.model_wrapped).__name__,
        "params": digest(p for _, p in sorted(model.named_parameters())),
        "flash_state": digest(optree.tree_leaves(s)),
        "plans": probe.plans,
        "local_losses": probe.local_losses,
        "skipped_grads_none": probe.skipped_grads,
        "counters": {k: float(v) for k, v in s.counters._asdict().items()},
        "weighting": {k: float(v) for k, v in s.weighting._asdict().items()},
        "spikes": int(s.safety.spikes),
        "rollbacks": [e for e in flash.events if "rollback" in e],
    }
    # the defaults (momentum predictor, stepping back), shortened: every process steps back on the same steps
    defaults = FlashModeCallback(DEFAULTS_CFG, verbose=False)
    model2 = tiny_gpt2()
    make_trainer(model2, os.path.join(out_dir, "defaults"), DEFAULTS_STEPS, [defaults], dataset=data,
                 gradient_accumulation_steps=ACCUM, ddp_backend="gloo", max_grad_norm=1.0, learning_rate=1e-3).train()
    result["defaults"] = {
        "params": digest(p for _, p in sorted(model2.named_parameters())),
        "flash_state": digest(optree.tree_leaves(defaults.state)),
        "stepped_back": defaults.get_stats()["stepped_back"],
        "events": [e for e in defaults.events if "steps back" in e],
    }
    # the same run with DDP built without find_unused_parameters is refused before the first step
    refused = FlashModeCallback(CFG, verbose=False)
    other = make_trainer(tiny_gpt2(), os.path.join(out_dir, "refused"), 2, [refused], dataset=data,
                         ddp_backend="gloo", ddp_find_unused_parameters=False)
    try:
        other.train()
        result["refusal"] = None
    except RuntimeError as err:
        result["refusal"] = str(err)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
