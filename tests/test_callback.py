"""Tests for ``FlashModeCallback`` driving a real ``transformers`` Trainer (tiny GPT-2, CPU, one thread).

Each test says what it shows about the run: the specification's quick-start,
what the optimizer really sees on a step with skipped layers, equality with
plain training where Flash Mode must not act, GCA's virtual steps and
rollback, the safety logic, logging, configuration errors and the fallback
for a model without repeated blocks.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any, Dict, List, Optional

import pytest
import torch
from trainer_helpers import (
    BATCH,
    DictLM,
    StepRecorder,
    assert_tree_equal,
    byte_dataset,
    make_args,
    make_trainer,
    optimizer_state_copy,
    params_of,
    run,
    tiny_gpt2,
)
from transformers import TrainerCallback

from flashfn import FlashConfig, FlashModeCallback
from flashfn.core import interpolate, unflatten
from flashfn.core.gca import GCADecision

QUIET = dict(verbose=False)


def flash_cb(trainer: Any) -> FlashModeCallback:
    """The ``FlashModeCallback`` instance a trainer holds."""
    cbs = [c for c in trainer.callback_handler.callbacks if isinstance(c, FlashModeCallback)]
    assert len(cbs) == 1
    return cbs[0]


def assert_params_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), f"parameter {n} differs"


def display_width(s: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in s)


# --------------------------------------------------------------------------- quick start


def test_quick_start_verbatim(tmp_path, capsys) -> None:
    """The specification's quick-start, as written, trains and prints figures measured on this run."""
    model = tiny_gpt2()
    training_args = make_args(tmp_path, 200)
    dataset = byte_dataset(BATCH * 200)

    # ---- the specification's quick start, verbatim ----
    from transformers import Trainer, TrainingArguments
    from transformers.flash_mode import FlashConfig, FlashModeCallback

    # Flash Mode configuration
    config = FlashConfig(
        enable_alas=True,
        enable_sample_weighting=True,
        enable_gca=True,
    )

    # Add the callback to the Trainer
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        callbacks=[FlashModeCallback(config)],
    )

    trainer.train()
    # ---- end of the quick start ----

    assert isinstance(training_args, TrainingArguments)
    cb = flash_cb(trainer)
    stats = cb.get_stats()
    assert stats["total_steps"] == 200
    assert stats["active_steps"] == 200 - config.warmup_steps
    # a byte-level LM's per-sample losses stay far above low_loss_threshold=0.5: weighting changes nothing, so
    # it steps back after step_back_after weighted steps; GCA's coherence never reaches 0.95, so it steps back too
    assert stats["samples_weighted"] == config.step_back_after * BATCH
    assert stats["stepped_back"]["weighting"] == config.warmup_steps + config.step_back_after
    assert stats["stepped_back"]["gca"] is not None and stats["gca_virtual_steps"] == 0
    assert any("sample weighting steps back" in e for e in cb.events)
    out = capsys.readouterr().out
    assert out.count("FLASH MODE — STATISTICS") == 1
    assert f"ALAS Savings: {100 * stats['alas_savings']:.1f}%" in out
    assert f"GCA Virtual Steps: {100 * stats['gca_virtual_share']:.1f}%" in out
    assert f"Sample Weight Avg: {stats['sample_weight_avg']:.3f}" in out
    assert "Total Steps: 200" in out
    assert f"Loss Spikes: {stats['loss_spikes']} | Auto-Disables: {stats['auto_disables']}" in out
    assert f"Stepped back (not helping): Weighting @ {stats['stepped_back']['weighting']}, GCA @ " in out


def test_statistics_box_lines_align_on_screen(tmp_path, capsys) -> None:
    """Every line of the printed box has the same display width (the emoji takes two columns, as in the spec)."""
    run(tmp_path, 3, [FlashModeCallback(FlashConfig(warmup_steps=1))])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln[:1] in ("╔", "║", "╠", "╚")]
    assert len(lines) == 13
    widths = {ln: display_width(ln) for ln in lines}
    assert len(set(widths.values())) == 1, widths


def test_figures_are_measured_not_constants(tmp_path) -> None:
    """Two differently configured runs report different figures; each respects its own configuration."""
    ds = byte_dataset(BATCH * 150)
    common = dict(warmup_steps=20, enable_gca=False, predictor="ema", min_fidelity=0.0, step_back_after=0, **QUIET)
    a = FlashModeCallback(FlashConfig(min_activity=0.3, low_loss_threshold=0.5, **common))
    b = FlashModeCallback(FlashConfig(min_activity=0.9, low_loss_threshold=10.0, **common))
    run(tmp_path / "a", 150, [a], dataset=ds)
    run(tmp_path / "b", 150, [b], dataset=ds)
    sa, sb = a.get_stats(), b.get_stats()
    for s in (sa, sb):
        assert s["total_steps"] == 150 and s["samples_weighted"] == 130 * BATCH
    # a byte-level LM's per-sample loss stays far above 0.5 here, and far below 10.0
    assert sa["sample_weight_avg"] == 1.0 and sa["samples_down_weighted"] == 0
    assert sb["sample_weight_avg"] < 1.0 and sb["samples_down_weighted"] == 130 * BATCH
    assert sa["alas_savings"] > 0
    assert sa["alas_savings"] != sb["alas_savings"]
    assert sa["alas_mean_activity"] != sb["alas_mean_activity"]
    # min_activity is a floor for every layer
    assert float(a.state.alas.activity.min()) >= 0.3
    assert float(b.state.alas.activity.min()) >= 0.9
    assert {k for k in sa if sa[k] != sb[k]} >= {"alas_savings", "sample_weight_avg", "samples_down_weighted"}


# --------------------------------------------------------------------------- skipped layers


class SkipProbe(TrainerCallback):
    """Placed after FlashModeCallback: records which parameters got an autograd gradient and what the optimizer saw.

    A post-accumulate-grad hook on every parameter marks the parameters into
    whose ``.grad`` autograd accumulated on the current step.
    """

    def __init__(self, flash: FlashModeCallback) -> None:
        self.flash = flash
        self.steps: List[Dict[str, Any]] = []
        self._handles: list = []
        self._accumulated: set = set()
        self._cur: Optional[Dict[str, Any]] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for n, p in model.named_parameters():
            self._handles.append(p.register_post_accumulate_grad_hook(lambda _p, n=n: self._accumulated.add(n)))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._accumulated = set()
        plan = self.flash._plan
        self._cur = {
            "state": self.flash.state,  # immutable: the state the plan was made from
            "skipped": plan.skipped,
            "compute": {n: self.flash.should_compute_backward(n) for n, _ in model.named_parameters()},
        }

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        cur = self._cur
        cur["accumulated"] = set(self._accumulated)
        cur["grads"] = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        cur["before"] = params_of(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        cur = self._cur
        cur["after"] = params_of(model)
        cur["lr"] = optimizer.param_groups[0]["lr"]
        self.steps.append(cur)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()


def _skip_run(tmp_path, max_grad_norm: float, optim: str, lr: float, accum: int = 1):
    # the same samples on every step: successive gradients are alike, so ALAS finds predictable layers and skips
    cfg = FlashConfig(warmup_steps=5, enable_gca=False, enable_sample_weighting=False, activity_decay=0.5,
                      honest_check_every=10, predictor="ema", **QUIET)
    flash = FlashModeCallback(cfg)
    probe = SkipProbe(flash)
    run(tmp_path, 60, [flash, probe], dataset=byte_dataset(BATCH * accum), max_grad_norm=max_grad_norm,
        optim=optim, learning_rate=lr, gradient_accumulation_steps=accum)
    skipped_steps = [s for s in probe.steps if s["skipped"]]
    assert len(probe.steps) == 60
    assert len(skipped_steps) >= 3, "the setting is meant to make ALAS skip layers"
    return flash, cfg, probe.steps, skipped_steps


@pytest.mark.parametrize("accum", [1, 2])
def test_skipped_layers_get_no_autograd_gradient_and_the_interpolated_one(tmp_path, accum) -> None:
    """On a step with skipped layers (every micro-batch of it), autograd leaves their parameters alone and the
    optimizer applies ALAS's interpolated gradient to them."""
    flash, cfg, steps, skipped_steps = _skip_run(tmp_path, max_grad_norm=0.0, optim="sgd", lr=0.05, accum=accum)
    lmap = flash.lmap
    assert len(lmap) == 4
    for s in steps:
        skipped_names = {n for i in s["skipped"] for n in lmap.params[i]}
        # should_compute_backward agrees with the plan, per parameter name and per block path
        assert {n for n, c in s["compute"].items() if not c} == skipped_names
        # autograd accumulated into exactly the parameters that were not skipped
        assert s["accumulated"] == set(s["compute"]) - skipped_names
        if not s["skipped"]:
            continue
        preds = interpolate(s["state"].alas, s["skipped"], trend_weight=cfg.trend_weight,
                            noise_scale=cfg.noise_scale, seed=cfg.seed)
        for i, pred in zip(s["skipped"], preds):
            shaped = unflatten(pred, [s["grads"][n] for n in lmap.params[i]])
            for n, g in zip(lmap.params[i], shaped):
                assert torch.equal(s["grads"][n], g.to(s["grads"][n].dtype)), n
                assert float(g.abs().sum()) > 0
        # plain SGD: the update is -lr * the gradient the probe saw, for injected and real gradients alike
        for n, g in s["grads"].items():
            expected = s["before"][n] - s["lr"] * g
            torch.testing.assert_close(s["after"][n], expected, rtol=1e-6, atol=1e-7)  # up to rounding
    # the block path answers like its parameters, and a parameter outside every block always computes
    assert flash._plan is None  # after training: nothing is planned
    assert flash.should_compute_backward(lmap.names[0]) is True
    assert flash.should_compute_backward("transformer.wte.weight") is True


def test_injected_gradients_respect_max_grad_norm(tmp_path) -> None:
    max_norm = 0.05
    flash, cfg, steps, skipped_steps = _skip_run(tmp_path, max_grad_norm=max_norm, optim="adamw_torch", lr=3e-3)
    lmap = flash.lmap
    for s in steps:
        grads = [g for g in s["grads"].values() if g is not None]
        total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        assert total <= max_norm * (1 + 1e-5)
    for s in skipped_steps:
        preds = interpolate(s["state"].alas, s["skipped"], trend_weight=cfg.trend_weight,
                            noise_scale=cfg.noise_scale, seed=cfg.seed)
        scales = []
        for i, pred in zip(s["skipped"], preds):
            shaped = unflatten(pred, [s["grads"][n] for n in lmap.params[i]])
            for n, g in zip(lmap.params[i], shaped):
                seen = s["grads"][n]
                assert float(torch.linalg.vector_norm(seen)) <= max_norm * (1 + 1e-5)
                scales.append(float((seen * g).sum() / (g * g).sum()))
                torch.testing.assert_close(seen, scales[-1] * g, rtol=1e-4, atol=1e-9)
        # one common factor in (0, 1] for every injected tensor: the prediction, clipped with the rest
        assert all(0 < c <= 1 + 1e-6 for c in scales)
        assert max(scales) - min(scales) <= 1e-4 * max(scales)


# --------------------------------------------------------------------------- equality with plain training


@pytest.fixture(scope="module")
def plain_dropout_run(tmp_path_factory):
    """A plain 40-step run with dropout on (any extra use of the global RNG would show)."""
    model = tiny_gpt2(dropout=0.1)
    rec = StepRecorder()
    run(tmp_path_factory.mktemp("plain"), 40, [rec], model=model)
    return params_of(model)


@pytest.mark.parametrize("cfg", [
    FlashConfig(enable_alas=False, enable_sample_weighting=False, enable_gca=False, warmup_steps=0),
    FlashConfig(warmup_steps=40),  # everything on, but the whole run is warm-up
    FlashConfig(warmup_steps=1000),
], ids=["all-disabled", "warmup-equals-max-steps", "warmup-beyond-max-steps"])
def test_inactive_flash_mode_is_bit_identical_to_plain_training(tmp_path, plain_dropout_run, cfg) -> None:
    model = tiny_gpt2(dropout=0.1)
    cb = FlashModeCallback(cfg, verbose=False)
    run(tmp_path, 40, [cb], model=model)
    assert_params_equal(params_of(model), plain_dropout_run)
    assert cb.get_stats()["total_steps"] == 40
    # the model is left as it was found: no instance forward, no hooks on the blocks
    assert "forward" not in vars(model)
    for block in model.transformer.h:
        assert not block._forward_hooks and not block._forward_pre_hooks


@pytest.mark.parametrize("accum", [1, 2])
def test_unit_weights_reproduce_the_trainer_loss(tmp_path, accum) -> None:
    """Sample weighting with every weight 1 (min_sample_weight=1.0) is the Trainer's own loss, with accumulation."""
    steps = 25
    plain = tiny_gpt2()
    t_plain = run(tmp_path / "plain", steps, [], model=plain, gradient_accumulation_steps=accum, logging_steps=1)
    cfg = FlashConfig(enable_alas=False, enable_gca=False, min_sample_weight=1.0, warmup_steps=0, step_back_after=0)
    cb = FlashModeCallback(cfg, verbose=False)
    flash = tiny_gpt2()
    t_flash = run(tmp_path / "flash", steps, [cb], model=flash, gradient_accumulation_steps=accum, logging_steps=1)
    stats = cb.get_stats()
    assert stats["samples_weighted"] == steps * BATCH * accum  # the weighted loss really replaced the model's
    assert stats["sample_weight_avg"] == 1.0
    loss_plain = [e["loss"] for e in t_plain.state.log_history if "loss" in e]
    loss_flash = [e["loss"] for e in t_flash.state.log_history if "loss" in e]
    assert len(loss_plain) == steps
    assert loss_flash == pytest.approx(loss_plain, rel=1e-5)
    pf, pp = params_of(flash), params_of(plain)
    for n in pp:
        torch.testing.assert_close(pf[n], pp[n], rtol=1e-4, atol=1e-5, msg=n)


# --------------------------------------------------------------------------- GCA


@pytest.fixture(scope="module")
def plain_schedule(tmp_path_factory):
    rec = StepRecorder()
    run(tmp_path_factory.mktemp("sched"), 30, [rec], warmup_steps=8, lr_scheduler_type="linear")
    return rec


def test_virtual_steps_never_advance_the_lr_schedule(tmp_path, plain_schedule) -> None:
    cfg = FlashConfig(warmup_steps=3, coherence_threshold=-1.0, max_virtual_steps=2, gca_checkpoint_every=3,
                      enable_alas=False, enable_sample_weighting=False, **QUIET)
    cb = FlashModeCallback(cfg)
    rec = StepRecorder()
    run(tmp_path, 30, [cb, rec], warmup_steps=8, lr_scheduler_type="linear")
    stats = cb.get_stats()
    assert stats["gca_virtual_steps"] > 0
    assert rec.lr == plain_schedule.lr
    assert rec.last_epoch == plain_schedule.last_epoch == list(range(1, 31))
    assert len(set(x[0] for x in rec.lr)) > 10  # the schedule really moves
    # the virtual steps went through the optimizer (its step counter ran ahead of the Trainer's)
    assert plain_schedule.opt_steps[-1] == 30
    if stats["gca_rollbacks"] == 0:
        assert rec.opt_steps[-1] == 30 + stats["gca_virtual_steps"]
    else:
        assert rec.opt_steps[-1] > 30


class ForceRollback(TrainerCallback):
    """Placed before FlashModeCallback: copies what a checkpoint saves, then turns a later decision into a rollback."""

    def __init__(self, flash: FlashModeCallback, steps_after_checkpoint: int = 3) -> None:
        self.flash = flash
        self.after = steps_after_checkpoint
        self.saved: Optional[Dict[str, Any]] = None
        self.saved_at: Optional[int] = None
        self.forced_at: Optional[int] = None
        self.params_before_rollback: Optional[Dict[str, torch.Tensor]] = None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        dec = self.flash._decision
        if self.forced_at is None and self.saved_at is not None and state.global_step == self.saved_at + self.after:
            self.flash._decision = GCADecision(False, 0, False, True)
            self.forced_at = state.global_step
            self.params_before_rollback = params_of(model)
            self.lr_before_rollback = [g["lr"] for g in optimizer.param_groups]
        elif dec.checkpoint and self.saved_at is None and not dec.rollback:
            self.saved = {"params": params_of(model), "optimizer": optimizer_state_copy(optimizer)}
            self.saved_at = state.global_step


class AfterRollback(TrainerCallback):
    """Placed after FlashModeCallback: what the parameters and optimizer hold right after the forced rollback."""

    def __init__(self, forcer: ForceRollback) -> None:
        self.forcer = forcer
        self.seen: Optional[Dict[str, Any]] = None

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.forcer.forced_at == state.global_step and self.seen is None:
            self.seen = {"params": params_of(model), "optimizer": optimizer_state_copy(optimizer),
                         "lr": [g["lr"] for g in optimizer.param_groups]}


def test_rollback_restores_parameters_and_optimizer_state_exactly(tmp_path) -> None:
    cfg = FlashConfig(warmup_steps=2, gca_checkpoint_every=4, enable_alas=False, enable_sample_weighting=False,
                      **QUIET)
    flash = FlashModeCallback(cfg)
    forcer = ForceRollback(flash)
    after = AfterRollback(forcer)
    rec = StepRecorder()
    run(tmp_path, 16, [forcer, flash, after, rec], warmup_steps=4, lr_scheduler_type="linear")
    assert forcer.saved_at is not None and forcer.forced_at == forcer.saved_at + 3
    assert after.seen is not None
    # training had moved on since the checkpoint ...
    assert any(not torch.equal(forcer.params_before_rollback[n], forcer.saved["params"][n])
               for n in forcer.saved["params"])
    # ... and the rollback brought back exactly what the checkpoint held
    assert_params_equal(after.seen["params"], forcer.saved["params"])
    assert_tree_equal(after.seen["optimizer"]["state"], forcer.saved["optimizer"]["state"])
    # the learning rate belongs to the schedule: the rollback keeps the current one, not the checkpoint's
    assert after.seen["lr"] == forcer.lr_before_rollback
    assert forcer.lr_before_rollback != [g["lr"] for g in forcer.saved["optimizer"]["param_groups"]]
    assert any("rollback" in e for e in flash.events)
    # the schedule is the Trainer's, untouched by the rollback
    assert rec.last_epoch == list(range(1, 17))


# --------------------------------------------------------------------------- safety


class LRBomb(TrainerCallback):
    """Multiplies the learning rate hugely on a few steps (what a diverging run looks like)."""

    def __init__(self, steps: range, lr: float = 1.0) -> None:
        self.steps = steps
        self.lr = lr

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step in self.steps:
            for g in optimizer.param_groups:
                g["lr"] = self.lr


class PlanRecorder(TrainerCallback):
    def __init__(self, flash: FlashModeCallback) -> None:
        self.flash = flash
        self.active: List[bool] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.active.append(self.flash._plan.active)


@pytest.mark.parametrize("bomb", [False, True], ids=["calm", "lr-spike"])
def test_loss_spike_is_detected_and_disables_flash_mode(tmp_path, bomb) -> None:
    cfg = FlashConfig(warmup_steps=10, **QUIET)
    flash = FlashModeCallback(cfg)
    plans = PlanRecorder(flash)
    cbs = [flash, plans] + ([LRBomb(range(30, 34))] if bomb else [])
    run(tmp_path, 60, cbs, logging_steps=1)
    stats = flash.get_stats()
    assert plans.active[:10] == [False] * 10
    if not bomb:
        assert stats["loss_spikes"] == 0 and stats["auto_disables"] == 0
        assert all(plans.active[10:])
        return
    assert stats["loss_spikes"] >= 1
    assert stats["auto_disables"] >= 1
    # from the spike on, Flash Mode stands aside (cool-down of 100 steps > the rest of the run)
    first_off = plans.active.index(False, 10)
    assert 30 <= first_off <= 40
    assert not any(plans.active[first_off:])
    assert stats["active_steps"] == first_off - 10


# --------------------------------------------------------------------------- logging


def test_figures_are_logged_every_log_every_steps(tmp_path, capsys) -> None:
    cb = FlashModeCallback(FlashConfig(warmup_steps=5, log_every=10), verbose=False)
    trainer = run(tmp_path, 35, [cb])
    flash_logs = [e for e in trainer.state.log_history if any(k.startswith("flash/") for k in e)]
    assert [e["step"] for e in flash_logs] == [10, 20, 30]
    for e in flash_logs:
        assert e["flash/total_steps"] == e["step"]
        assert e["flash/active_steps"] == e["step"] - 5
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for k, v in e.items() if k.startswith("flash/"))
    assert "FLASH MODE" not in capsys.readouterr().out  # verbose=False: no box


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(min_activity=0.0), ValueError, "min_activity"),
    (dict(min_activity=1.5), ValueError, "min_activity"),
    (dict(honest_check_every=0), ValueError, "honest_check_every"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(loss_spike_threshold=1.0), ValueError, "loss_spike_threshold"),
    (dict(coherence_threshold=1.5), ValueError, "coherence_threshold"),
    (dict(log_every=0), ValueError, "log_every"),
    (dict(enable_alas="yes"), TypeError, "enable_alas"),
    (dict(max_virtual_steps=1.5), TypeError, "max_virtual_steps"),
])
def test_config_errors_name_the_field(kwargs, exc, field) -> None:
    with pytest.raises(exc, match=field):
        FlashModeCallback(FlashConfig(**kwargs))


@pytest.mark.parametrize("config", ["x", {"enable_alas": True}, 1])
def test_callback_rejects_a_config_that_is_not_a_flashconfig(config) -> None:
    with pytest.raises(TypeError, match="config"):
        FlashModeCallback(config)


def test_callback_rejects_a_non_bool_verbose() -> None:
    with pytest.raises(TypeError, match="verbose"):
        FlashModeCallback(FlashConfig(), verbose="yes")


def test_callback_defaults_to_the_specification_config() -> None:
    assert FlashModeCallback().config == FlashConfig()


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("gca", [False, True])
def test_model_without_blocks_falls_back_and_trains(tmp_path, gca) -> None:
    steps = 40
    torch.manual_seed(0)
    plain = DictLM()
    t_plain = make_trainer(plain, tmp_path / "plain", steps, logging_steps=5)
    t_plain.train()
    torch.manual_seed(0)
    model = DictLM()
    cb = FlashModeCallback(FlashConfig(warmup_steps=5, enable_gca=gca), verbose=False)
    trainer = make_trainer(model, tmp_path / "flash", steps, [cb], logging_steps=5)
    trainer.train()
    assert any("no repeated blocks" in e and "ALAS" in e for e in cb.events)
    assert any("sample weighting is off" in e for e in cb.events)
    stats = cb.get_stats()
    assert stats["total_steps"] == steps
    assert stats["alas_savings"] == 0.0 and stats["samples_weighted"] == 0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    if not gca:  # nothing is left to act: exactly plain training
        assert_params_equal(params_of(model), params_of(plain))


def test_momentum_predictor_without_a_first_moment_says_so_and_skips_nothing(tmp_path) -> None:
    """Plain SGD keeps no first moment: the default predictor has nothing to read, logs it once and never skips."""
    cb = FlashModeCallback(FlashConfig(warmup_steps=2, honest_check_every=2, min_fidelity=0.0, step_back_after=0,
                                       enable_sample_weighting=False, enable_gca=False, **QUIET))
    run(tmp_path, 12, [cb], optim="sgd", learning_rate=0.05)
    warnings = [e for e in cb.events if "keeps no first moment" in e]
    assert len(warnings) == 1 and "SGD" in warnings[0]
    stats = cb.get_stats()
    assert stats["alas_savings"] == 0.0 and stats["alas_mean_fidelity"] is None


def test_momentum_predictor_measures_adam_first_moment(tmp_path) -> None:
    """With AdamW the default predictor measures fidelity at the honest checks and keeps no gradient history."""
    cb = FlashModeCallback(FlashConfig(warmup_steps=2, honest_check_every=2, step_back_after=0,
                                       enable_sample_weighting=False, enable_gca=False, **QUIET))
    run(tmp_path, 12, [cb], optim="adamw_torch", learning_rate=3e-3)
    stats = cb.get_stats()
    assert not any("keeps no first moment" in e for e in cb.events)
    assert stats["alas_mean_fidelity"] is not None and -1.0 <= stats["alas_mean_fidelity"] <= 1.0
    assert stats["alas_history_bytes"] == 0


def test_gca_stepping_back_drops_its_rollback_copy(tmp_path) -> None:
    """Once GCA steps back it keeps (and would save) no copy of the parameters and optimizer state."""
    cb = FlashModeCallback(FlashConfig(warmup_steps=4, step_back_after=2, gca_checkpoint_every=3,
                                       coherence_threshold=1.0, enable_alas=False, enable_sample_weighting=False,
                                       **QUIET))
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(cb._snapshot is not None)

    run(tmp_path, 30, [cb, Probe()])
    at = cb.get_stats()["stepped_back"]["gca"]
    assert at is not None and at < 30
    assert any(seen[:at]) and not any(seen[at:])  # it had one while it was on, none after
