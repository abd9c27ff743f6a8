"""``FlashConfig.history_dtype``: ALAS's gradient history stored compactly, reported, and still usable."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_helpers import BATCH, byte_dataset, make_trainer, run, tiny_gpt2

from flashfn import ALASTracker, FlashConfig, FlashModeCallback
from flashfn.core.flash import flash_init


def _train(tmp_path, history_dtype: str):
    cfg = FlashConfig(warmup_steps=5, honest_check_every=10, activity_decay=0.5, predictor="ema",
                      history_dtype=history_dtype, verbose=False)
    cb = FlashModeCallback(cfg)
    model = tiny_gpt2()
    trainer = run(tmp_path / history_dtype, 40, [cb], model=model, logging_steps=1,
                  dataset=byte_dataset(BATCH))  # the same samples every step: ALAS skips and predicts
    return cb, model, [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_bfloat16_history_halves_the_reported_bytes_and_training_stays_finite(tmp_path) -> None:
    cb32, _, losses32 = _train(tmp_path, "float32")
    cb16, model16, losses16 = _train(tmp_path, "bfloat16")
    s32, s16 = cb32.get_stats(), cb16.get_stats()
    history_params = sum(len(names) and sum(dict(model16.named_parameters())[n].numel() for n in names)
                         for names in cb16.lmap.params)
    assert s32["alas_history_bytes"] == 3 * 4 * history_params  # average, last, previous in float32
    assert s16["alas_history_bytes"] * 2 == s32["alas_history_bytes"]
    assert s16["alas_history_vs_params"] == pytest.approx(s32["alas_history_vs_params"] / 2)
    assert s32["memory_bytes"] - s16["memory_bytes"] == s16["alas_history_bytes"]  # the rest is unchanged
    alas = cb16.state.alas
    assert all(t.dtype == torch.bfloat16 and bool(torch.isfinite(t).all()) for t in (*alas.avg, *alas.last, *alas.prev))
    # the compact history was really used: layers were skipped and got its predictions
    assert s16["alas_skipped_layer_share"] > 0
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in model16.parameters())
    assert all(math.isfinite(x) for x in losses16) and losses16[-1] < losses16[0]
    assert losses16[-1] == pytest.approx(losses32[-1], rel=0.05)


def test_a_checkpoint_with_another_history_dtype_is_refused(tmp_path) -> None:
    """A float32 history is never loaded into a bfloat16 run (or the reverse): the error names the field."""
    def train(dtype: str, steps: int, resume=None):
        cb = FlashModeCallback(FlashConfig(warmup_steps=2, predictor="ema", history_dtype=dtype, verbose=False))
        make_trainer(tiny_gpt2(), tmp_path, steps, [cb], save_strategy="steps", save_steps=4).train(
            resume_from_checkpoint=resume)
        return cb

    train("float32", 4)
    with pytest.raises(ValueError, match=r"different config.*'history_dtype': 'float32'.*'history_dtype': 'bfloat16'"):
        train("bfloat16", 6, resume=str(tmp_path / "checkpoint-4"))
    assert int(train("float32", 6, resume=str(tmp_path / "checkpoint-4")).state.step) == 6


def test_flash_init_and_the_tracker_take_the_config_names() -> None:
    layers = ((torch.zeros(3, 2), torch.zeros(2)),)
    assert flash_init(layers, (), history_dtype="bfloat16").alas.avg[0].dtype == torch.bfloat16
    assert flash_init(layers, (), history_dtype="float32").alas.avg[0].dtype == torch.float32
    with pytest.raises(ValueError, match="history_dtype"):
        flash_init(layers, (), history_dtype="float16")
    m = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)]))
    bytes_ = {}
    for dtype in ("float32", "bfloat16"):
        t = ALASTracker(history_dtype=dtype)
        t.initialize(m)
        bytes_[dtype] = t.get_stats()["history_bytes"]
        assert t.state.avg[0].dtype == getattr(torch, dtype)
    assert bytes_["bfloat16"] < bytes_["float32"]
    with pytest.raises(ValueError, match="history_dtype"):
        ALASTracker(history_dtype="float64")
