"""Set-ups at the edge of what Flash Mode supports, each with the behaviour ``docs/support.md`` documents.

Through a real ``transformers`` Trainer on CPU (tiny GPT-2 / BERT, one
thread): a model in which ALAS finds no layers, a loss that cannot be split
per sample, ``max_steps`` below ``warmup_steps``, gradient accumulation, and
bf16 autocast on CPU.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import pytest
import torch
from helpers_models import tiny_bert_cls
from trainer_helpers import (
    BATCH,
    StepRecorder,
    byte_dataset,
    make_args,
    make_trainer,
    params_of,
    run,
    tiny_gpt2,
)
from transformers import Trainer, TrainerCallback

from flashfn import FlashConfig, FlashModeCallback

QUIET = dict(verbose=False)


def assert_params_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"parameter {n} differs"


def logged_losses(trainer: Trainer) -> List[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


# --------------------------------------------------------------------------- no ALAS layers


def test_no_alas_layers_turns_only_alas_off(tmp_path) -> None:
    """A GPT-2 with one block has no repeated blocks: ALAS is off (logged); sample weighting and GCA still act."""
    steps, warmup = 20, 4
    model = tiny_gpt2(n_layer=1)
    cb = FlashModeCallback(FlashConfig(warmup_steps=warmup, step_back_after=0, **QUIET))
    trainer = run(tmp_path, steps, [cb], model=model, logging_steps=1)
    assert any("no repeated blocks" in e and "ALAS" in e and "off" in e for e in cb.events)
    assert len(cb.lmap) == 0 and cb._skipper is None
    assert (cb._effective.enable_alas, cb._effective.enable_sample_weighting, cb._effective.enable_gca) == \
        (False, True, True)
    stats = cb.get_stats()
    assert stats["total_steps"] == steps and stats["active_steps"] == steps - warmup
    assert stats["alas_skipped_layer_share"] == 0.0 and stats["alas_history_bytes"] == 0
    assert stats["samples_weighted"] == (steps - warmup) * BATCH  # sample weighting acted on every active step
    assert cb.state.gca.direction.numel() > 0 and bool(torch.isfinite(cb.state.gca.direction).all())  # GCA followed
    losses = logged_losses(trainer)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_explicit_layers_that_match_nothing_are_refused(tmp_path) -> None:
    cb = FlashModeCallback(FlashConfig(layers=("no.such.block",), **QUIET))
    with pytest.raises(ValueError, match=r"layers.*no\.such\.block"):
        run(tmp_path, 3, [cb])


# --------------------------------------------------------------------------- loss not split per sample


def _shifted_ce(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    logits = outputs["logits"][:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


@pytest.mark.parametrize("how", ["label_smoothing", "compute_loss_func"])
def test_a_loss_the_trainer_computes_turns_weighting_off_and_is_watched(tmp_path, how) -> None:
    """The Trainer computes the loss (label smoothing, ``compute_loss_func``): the model gets no labels, so the loss
    cannot be split per sample. Sample weighting falls back (logged); the loss Flash Mode watches for spikes is the
    Trainer's, never a missing (NaN) one; with nothing else on, training is exactly plain training."""
    steps = 12
    extra: Dict[str, Any] = {"label_smoothing_factor": 0.1} if how == "label_smoothing" else {}
    loss_func = _shifted_ce if how == "compute_loss_func" else None

    def train(callbacks: List[Any], out: str) -> Trainer:
        model = tiny_gpt2()
        trainer = Trainer(model=model, args=make_args(tmp_path / out, steps, logging_steps=1, **extra),
                          train_dataset=byte_dataset(BATCH * steps), callbacks=callbacks, compute_loss_func=loss_func)
        trainer.train()
        return trainer

    plain = train([], "plain")
    cb = FlashModeCallback(FlashConfig(enable_alas=False, enable_gca=False, warmup_steps=2, **QUIET))
    flash = train([cb], "flash")
    assert any("sample weighting is off" in e and "outside the model" in e for e in cb.events)
    stats = cb.get_stats()
    assert stats["samples_weighted"] == 0 and stats["nonfinite_losses"] == 0
    assert stats["active_steps"] == steps - 2
    # the watched loss is the Trainer's: after the run the smoothed loss lies within the logged losses
    losses = logged_losses(flash)
    assert min(losses) <= float(cb.state.safety.fast) <= max(losses)
    assert_params_equal(params_of(flash.model), params_of(plain.model))
    assert "compute_loss" not in vars(flash)  # the Trainer is left as it was found


def test_a_head_without_per_sample_loss_turns_weighting_off(tmp_path) -> None:
    """A regression head (``num_labels=1``, mean squared error): sample weighting falls back (logged), ALAS acts."""
    steps = 16
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 64, (12,), generator=g), "labels": torch.randn((), generator=g)}
            for _ in range(BATCH * steps)]
    model = tiny_bert_cls(num_labels=1)
    cb = FlashModeCallback(FlashConfig(warmup_steps=3, honest_check_every=4, activity_decay=0.5, **QUIET))
    trainer = make_trainer(model, tmp_path, steps, [cb], dataset=data, logging_steps=1)
    trainer.train()
    assert any("sample weighting is off" in e and "cannot be split per sample" in e for e in cb.events)
    stats = cb.get_stats()
    assert stats["samples_weighted"] == 0 and stats["nonfinite_losses"] == 0
    assert len(cb.lmap) == 3 and stats["active_steps"] == steps - 3
    assert all(math.isfinite(x) for x in logged_losses(trainer))


# --------------------------------------------------------------------------- max_steps < warmup_steps


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    model = tiny_gpt2(dropout=0.1)
    run(tmp_path_factory.mktemp("plain"), 15, [], model=model)
    return params_of(model)


def test_max_steps_below_warmup_never_acts_and_says_so(tmp_path, plain_run) -> None:
    model = tiny_gpt2(dropout=0.1)
    cb = FlashModeCallback(FlashConfig(warmup_steps=40, **QUIET))
    run(tmp_path, 15, [cb], model=model)
    assert any("max_steps=15 <= warmup_steps=40" in e and "never acts" in e for e in cb.events)
    stats = cb.get_stats()
    assert stats["total_steps"] == 15 and stats["active_steps"] == 0 and stats["honest_steps"] == 15
    assert stats["samples_weighted"] == 0 and stats["gca_virtual_steps"] == 0
    assert_params_equal(params_of(model), plain_run)  # bit-identical to plain training


def test_epoch_based_run_shorter_than_warmup_is_logged_too(tmp_path) -> None:
    """``max_steps`` unset (``num_train_epochs``): the run's length is known at the start and the warning is given."""
    cb = FlashModeCallback(FlashConfig(warmup_steps=40, **QUIET))
    trainer = make_trainer(tiny_gpt2(), tmp_path, -1, [cb], dataset=byte_dataset(BATCH * 6), num_train_epochs=2,
                           logging_steps=1)
    trainer.train()
    assert trainer.state.global_step == 12
    assert any("max_steps=12 <= warmup_steps=40" in e for e in cb.events)
    assert cb.get_stats()["active_steps"] == 0


# --------------------------------------------------------------------------- gradient accumulation


class AccumProbe(TrainerCallback):
    """After FlashModeCallback: counts the hooks and records, per optimizer step, the gradient the optimizer sees
    and Flash Mode's state after the step."""

    def __init__(self, flash: FlashModeCallback) -> None:
        self.flash = flash
        self.calls = {"on_step_begin": 0, "on_pre_optimizer_step": 0, "on_optimizer_step": 0, "on_step_end": 0,
                      "on_substep_end": 0}
        self.forwards = 0
        self.steps: List[Dict[str, Any]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))

    def on_step_begin(self, args, state, control, **kwargs):
        self.calls["on_step_begin"] += 1

    def on_substep_end(self, args, state, control, **kwargs):
        self.calls["on_substep_end"] += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.calls["on_pre_optimizer_step"] += 1
        self.steps.append({"grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}})

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.calls["on_optimizer_step"] += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.calls["on_step_end"] += 1
        self.steps[-1]["state"] = self.flash.state


def test_gradient_accumulation_is_seen_once_per_optimizer_step(tmp_path) -> None:
    steps, accum, warmup = 12, 3, 4
    plain_rec = StepRecorder(grads=True)
    # no clipping: on a step with skipped layers the completed gradient would be clipped again, after ALAS read it
    kw = dict(gradient_accumulation_steps=accum, logging_steps=1, max_grad_norm=0.0)
    run(tmp_path / "plain", steps, [plain_rec], **kw)
    cfg = FlashConfig(warmup_steps=warmup, honest_check_every=2, activity_decay=0.5, predictor="ema", **QUIET)
    cb = FlashModeCallback(cfg)
    probe = AccumProbe(cb)
    trainer = run(tmp_path / "flash", steps, [cb, probe], **kw)
    # the hooks run once per optimizer step, the forward once per micro-batch
    assert probe.calls["on_pre_optimizer_step"] == probe.calls["on_step_end"] == steps
    assert probe.calls["on_substep_end"] == steps * (accum - 1)
    assert probe.forwards == steps * accum
    # every counter counts optimizer steps; sample weighting weighs every sample of every micro-batch
    stats = cb.get_stats()
    assert stats["total_steps"] == steps == int(cb.state.step) == int(cb.state.alas.step) == trainer.state.global_step
    assert stats["active_steps"] == steps - warmup
    assert stats["samples_weighted"] == (steps - warmup) * BATCH * accum
    # the loss Flash Mode watches is the step's mean loss on the same scale in warm-up and after: no false spike
    assert stats["loss_spikes"] == 0 and stats["auto_disables"] == 0
    # (the Trainer's logged loss divides by every label, the shifted loss has one target fewer per sample: 31/32)
    first_loss = logged_losses(trainer)[0]
    assert float(probe.steps[0]["state"].safety.fast) == pytest.approx(first_loss, rel=0.05)  # not 1/accum of it
    # warm-up: the gradient read is the whole accumulated one, exactly plain training's
    for k in range(warmup):
        for n, g in plain_rec.seen_grads[k].items():
            assert torch.equal(probe.steps[k]["grads"][n], g), (k, n)
    # every layer that computed its gradient put the accumulated gradient (as the optimizer saw it) into its history
    checked = 0
    for k, s in enumerate(probe.steps):
        before = probe.steps[k - 1]["state"].alas.observed if k else torch.zeros_like(s["state"].alas.observed)
        for i, names in enumerate(cb.lmap.params):
            if int(s["state"].alas.observed[i]) == int(before[i]) + 1:
                flat = torch.cat([s["grads"][n].reshape(-1) for n in names])
                assert torch.equal(s["state"].alas.last[i], flat), (k, i)
                checked += 1
    assert checked >= steps * len(cb.lmap) // 2


# --------------------------------------------------------------------------- bf16 autocast on CPU


def test_bf16_autocast_on_cpu_is_supported(tmp_path) -> None:
    """``TrainingArguments(bf16=True, use_cpu=True)``: the forward runs in bfloat16 under autocast; gradients,
    ALAS's history and the watched loss stay float32 and finite; every component acts."""
    steps = 40
    cfg = FlashConfig(warmup_steps=5, honest_check_every=10, activity_decay=0.5, predictor="ema", **QUIET)
    cb = FlashModeCallback(cfg)
    model = tiny_gpt2()
    dtypes: List[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    trainer = run(tmp_path, steps, [cb], model=model, bf16=True, logging_steps=1,
                  dataset=byte_dataset(BATCH))  # the same samples every step: ALAS finds layers to skip
    assert torch.bfloat16 in dtypes  # autocast was on
    stats = cb.get_stats()
    assert stats["total_steps"] == steps and stats["nonfinite_losses"] == 0 and stats["loss_spikes"] == 0
    assert stats["alas_skipped_layer_share"] > 0 and stats["samples_weighted"] > 0
    alas = cb.state.alas
    assert stats["alas_history_bytes"] > 0
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in (*alas.avg, *alas.last))
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model.parameters())
    losses = logged_losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert float(cb.state.safety.fast) == pytest.approx(sum(losses[-10:]) / 10, rel=0.2)
