"""Checkpoint and resume: Flash Mode's state travels with every Trainer checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
from trainer_helpers import make_trainer, params_of, tiny_gpt2

from flashfn import FlashConfig, FlashModeCallback
from flashfn.adapters.callback import STATE_FILE

N, K = 40, 20
# every component acts from step 5 on; GCA fires (coherence threshold -1) so its snapshot is saved too
CFG = FlashConfig(warmup_steps=5, honest_check_every=4, min_activity=0.3, activity_decay=0.5,
                  coherence_threshold=-1.0, gca_checkpoint_every=3, low_loss_threshold=10.0, verbose=False,
                  predictor="ema", min_fidelity=0.0, step_back_after=0)


def _train(out_dir, cfg=CFG, resume=None, max_steps=N, model=None):
    flash = FlashModeCallback(cfg)
    model = tiny_gpt2() if model is None else model
    trainer = make_trainer(model, out_dir, max_steps, [flash], save_strategy="steps", save_steps=K)
    trainer.train(resume_from_checkpoint=resume)
    return model, flash


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path) -> None:
    full_model, full = _train(tmp_path / "full")
    ckpt = tmp_path / "full" / f"checkpoint-{K}"
    assert (ckpt / STATE_FILE).is_file()
    # the uninterrupted run really used every component
    stats = full.get_stats()
    assert stats["alas_savings"] > 0 and stats["gca_virtual_steps"] > 0 and stats["samples_down_weighted"] > 0
    resumed_model, resumed = _train(tmp_path / "again", resume=str(ckpt))
    assert any("restored" in e for e in resumed.events)
    assert int(resumed.state.step) == int(full.state.step) == N
    a, b = params_of(full_model), params_of(resumed_model)
    assert all(torch.equal(a[n], b[n]) for n in a), "the resumed run diverged from the uninterrupted one"
    assert resumed.get_stats()["gca_virtual_steps"] == stats["gca_virtual_steps"]


def test_checkpoint_without_flash_state_resumes_with_a_warning(tmp_path) -> None:
    _train(tmp_path / "run", max_steps=K)
    ckpt = tmp_path / "run" / f"checkpoint-{K}"
    os.remove(ckpt / STATE_FILE)  # as if saved before Flash Mode was added
    _, flash = _train(tmp_path / "run", resume=str(ckpt), max_steps=K + 4)
    assert any("holds no Flash Mode state" in e for e in flash.events)
    assert int(flash.state.step) == 4  # a fresh state, counting from the resume


def test_mismatched_config_is_refused(tmp_path) -> None:
    _train(tmp_path / "run", max_steps=K)
    ckpt = str(tmp_path / "run" / f"checkpoint-{K}")
    with pytest.raises(ValueError, match="different config"):
        _train(tmp_path / "run", cfg=CFG.replace(min_activity=0.5), resume=ckpt, max_steps=K + 4)
    # logging settings are not part of what must match
    _train(tmp_path / "run", cfg=CFG.replace(log_every=7), resume=ckpt, max_steps=K + 2)


def test_corrupt_state_is_refused(tmp_path) -> None:
    _train(tmp_path / "run", max_steps=K)
    ckpt = tmp_path / "run" / f"checkpoint-{K}"
    (ckpt / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="unreadable"):
        _train(tmp_path / "run", resume=str(ckpt), max_steps=K + 4)


def test_state_of_another_format_is_refused_naming_it(tmp_path) -> None:
    """A state saved by another flashfn version (another format) is never reused, and the error says why."""
    _train(tmp_path / "run", max_steps=K)
    ckpt = tmp_path / "run" / f"checkpoint-{K}"
    payload = torch.load(ckpt / STATE_FILE, weights_only=True)
    payload["format"] = 1
    torch.save(payload, ckpt / STATE_FILE)
    with pytest.raises(RuntimeError, match="found format 1"):
        _train(tmp_path / "run", resume=str(ckpt), max_steps=K + 4)
