"""Faults: a non-finite loss or gradient never enters Flash Mode's state, is counted, and training goes on."""

from __future__ import annotations

import torch
from trainer_helpers import run
from transformers import TrainerCallback

from flashfn import FlashConfig, FlashModeCallback

CFG = FlashConfig(warmup_steps=4, honest_check_every=3, activity_decay=0.5, coherence_threshold=-1.0,
                  gca_checkpoint_every=3, low_loss_threshold=10.0, verbose=False,
                  predictor="ema", min_fidelity=0.0, step_back_after=0)  # every component acts, whatever it measures
BAD_STEPS = (6, 11)


class CorruptGradients(TrainerCallback):
    """Placed before FlashModeCallback: on chosen steps every gradient Flash Mode reads is NaN or Inf."""

    def __init__(self) -> None:
        self.saved = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step in BAD_STEPS:
            value = float("nan") if state.global_step == BAD_STEPS[0] else float("inf")
            for n, p in model.named_parameters():
                if p.grad is not None:
                    self.saved[n] = p.grad.clone()
                    p.grad.fill_(value)


class RestoreGradients(TrainerCallback):
    """Placed after FlashModeCallback: puts the real gradients back so that the optimizer step stays finite
    (the fault under test is what Flash Mode reads, not what the optimizer does with it)."""

    def __init__(self, corrupt: CorruptGradients) -> None:
        self.corrupt = corrupt

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for n, p in model.named_parameters():
            if n in self.corrupt.saved and p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                p.grad.copy_(self.corrupt.saved[n])
        self.corrupt.saved = {}


class NaNLossOnce(TrainerCallback):
    """Makes the model's loss NaN on one step, from inside the model (its embeddings), and zeroes the resulting
    gradients before Flash Mode and the optimizer see them."""

    def __init__(self, flash: FlashModeCallback, step: int) -> None:
        self.flash, self.step = flash, step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self._handle = model.transformer.wte.register_forward_hook(lambda m, a, out: out * float("nan"))

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self._handle.remove()
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()


def test_non_finite_gradients_never_enter_the_state(tmp_path) -> None:
    flash = FlashModeCallback(CFG)
    corrupt = CorruptGradients()
    trainer = run(tmp_path, 20, [corrupt, flash, RestoreGradients(corrupt)])
    s = flash.state
    assert int(s.step) == 20  # training went on to the end
    # ALAS history, heat, stability, activity and GCA's direction stayed finite
    assert all(bool(torch.isfinite(x).all()) for x in s.alas.avg + s.alas.last + s.alas.prev)
    assert bool(torch.isfinite(s.alas.heat).all()) and bool(torch.isfinite(s.alas.activity).all())
    assert bool(torch.isfinite(s.gca.direction).all()) and bool(torch.isfinite(s.gca.anchor).all())
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    stats = flash.get_stats()
    assert stats["alas_savings"] > 0 and stats["gca_virtual_steps"] > 0  # the components kept acting


def test_a_nan_loss_is_counted_and_kept_out_of_the_averages(tmp_path) -> None:
    flash = FlashModeCallback(CFG)
    run(tmp_path, 16, [NaNLossOnce(flash, 8), flash])
    s = flash.state
    assert int(s.safety.nonfinite) == 1 and flash.get_stats()["nonfinite_losses"] == 1
    assert bool(torch.isfinite(s.safety.fast)) and bool(torch.isfinite(s.safety.baseline))
    assert bool(torch.isfinite(s.gca.loss_ema)) and bool(torch.isfinite(s.gca.direction).all())
    avg = flash.get_stats()["sample_weight_avg"]
    assert avg is not None and 0.3 <= avg <= 1.0
    assert int(s.step) == 16
