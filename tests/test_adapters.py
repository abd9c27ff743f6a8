"""Tests for the specification's stateful classes: ``ALASTracker``, ``SampleWeighter`` and ``ConservativeGCA``.

Figures are compared with plain references written here (a for-loop over
samples, ``sum|g| / sum|w|`` over a block's tensors, the documented GCA
formula), never with numbers read back from the code under test.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from trainer_helpers import byte_dataset, tiny_gpt2

from flashfn import ALASTracker, ConservativeGCA, SampleWeighter

BLOCKS = [f"transformer.h.{i}" for i in range(4)]


def names_field(field: str) -> str:
    """A pattern that finds ``field`` as a whole name in an error message (``x.field`` counts, ``gca_field`` not)."""
    return rf"(?<!\w){re.escape(field)}(?!\w)"


@pytest.fixture()
def gpt2_and_batch():
    model = tiny_gpt2()
    ds = byte_dataset(4)
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("input_ids", "labels")}
    return model, batch


def backward(model, batch) -> None:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()


# --------------------------------------------------------------------------- ALASTracker


def test_alas_tracker_finds_the_blocks_and_answers_by_name(gpt2_and_batch) -> None:
    model, _ = gpt2_and_batch
    tracker = ALASTracker(min_activity=0.3, honest_check_every=20)
    with pytest.raises(RuntimeError, match="initialize"):
        tracker.should_compute_backward("transformer.h.0")
    tracker.initialize(model)
    stats = tracker.get_stats()
    assert stats["layers"] == BLOCKS
    assert stats["steps"] == 0
    assert stats["activity"] == [1.0] * 4
    for name, _ in model.named_parameters():  # nothing is skipped before anything was measured
        assert tracker.should_compute_backward(name) is True
    for block in BLOCKS:
        assert tracker.should_compute_backward(block) is True
    for bad in ("nope", "transformer.h.9", "transformer.h.0.attn.c_attn"):  # the last is a module, not a block
        with pytest.raises(KeyError):
            tracker.should_compute_backward(bad)


def test_alas_tracker_update_metrics_after_a_real_backward(gpt2_and_batch) -> None:
    model, batch = gpt2_and_batch
    tracker = ALASTracker(min_activity=0.3, honest_check_every=20)
    tracker.initialize(model)
    backward(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker.update_metrics(model)
    stats = tracker.get_stats()
    assert stats["steps"] == 1
    # heat is gradient magnitude over weight magnitude: doubling the gradients of block 1 only doubles its heat
    doubled = ALASTracker(min_activity=0.3, honest_check_every=20)
    doubled.initialize(model)
    for p in model.transformer.h[1].parameters():
        p.grad.mul_(2.0)
    doubled.update_metrics(model)
    heat2 = doubled.get_stats()["heat"]
    for i in range(4):
        assert stats["heat"][i] > 0
        assert heat2[i] == pytest.approx(stats["heat"][i] * (2.0 if i == 1 else 1.0), rel=1e-5)
        assert 0.3 <= stats["activity"][i] <= 1.0
        assert math.isnan(stats["fidelity"][i])  # nothing was predicted yet
    assert stats["history_bytes"] > 0
    # the model's gradients and weights were read, not changed
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n] * (2.0 if n.startswith("transformer.h.1.") else 1.0))
        assert torch.equal(p.detach(), weights[n])
    for p in model.transformer.h[1].parameters():
        p.grad.div_(2.0)
    # the same gradient again: the history predicts it exactly
    tracker.update_metrics(model)
    assert tracker.get_stats()["fidelity"] == pytest.approx([1.0] * 4, abs=1e-5)


def test_alas_tracker_decisions(gpt2_and_batch) -> None:
    """Repeated identical gradients make layers predictable: activity falls to min_activity, never below,
    skipping appears, honest checks compute everything, and names agree with their block."""
    model, batch = gpt2_and_batch
    backward(model, batch)
    trackers = [ALASTracker(min_activity=0.3, honest_check_every=5, activity_decay=0.5, seed=s) for s in (0, 0, 1)]
    for t in trackers:
        t.initialize(model)
    params = {n: [m for m, _ in model.named_parameters() if m.startswith(n + ".")] for n in BLOCKS}
    seen = [[], [], []]
    for _ in range(40):
        for t, log in zip(trackers, seen):
            t.update_metrics(model)
            stats = t.get_stats()
            assert min(stats["activity"]) >= 0.3 - 1e-6
            decision = stats["next_backward"]
            for i, block in enumerate(BLOCKS):
                assert t.should_compute_backward(block) is decision[i]
                assert all(t.should_compute_backward(n) is decision[i] for n in params[block])
            log.append((stats["steps"], decision))
    t0 = trackers[0]
    assert min(t0.get_stats()["activity"]) == pytest.approx(0.3, abs=1e-3)
    assert any(not all(d) for _, d in seen[0])  # some layer was skipped
    assert all(all(d) for step, d in seen[0] if step % 5 == 0)  # honest checks
    assert seen[0] == seen[1]  # same seed, same inputs: same decisions
    assert seen[0] != seen[2]


def test_alas_tracker_counts_a_layer_without_gradients_as_skipped(gpt2_and_batch) -> None:
    model, batch = gpt2_and_batch
    tracker = ALASTracker()
    tracker.initialize(model)
    backward(model, batch)
    tracker.update_metrics(model)
    heat = tracker.get_stats()["heat"]
    for p in model.transformer.h[2].parameters():
        p.grad = None
    tracker.update_metrics(model)
    assert tracker.state.skip_streak.tolist() == [0, 0, 1, 0]
    assert tracker.state.observed.tolist() == [2, 2, 1, 2]
    assert tracker.get_stats()["heat"][2] == heat[2]


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(min_activity=0.0), ValueError, "min_activity"),
    (dict(min_activity=1.01), ValueError, "min_activity"),
    (dict(honest_check_every=0), ValueError, "honest_check_every"),
    (dict(activity_decay=1.0), ValueError, "activity_decay"),
    (dict(honest_check_every=2.5), TypeError, "honest_check_every"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps"),
    (dict(layers="transformer.h"), TypeError, "layers"),
])
def test_alas_tracker_config_errors_name_the_argument(kwargs, exc, field) -> None:
    with pytest.raises(exc, match=names_field(field)):
        ALASTracker(**kwargs)


# --------------------------------------------------------------------------- SampleWeighter


def reference_weight(loss: float, min_weight: float, threshold: float) -> float:
    if not math.isfinite(loss) or loss >= threshold:
        return 1.0
    return min_weight + (1.0 - min_weight) * max(loss, 0.0) / threshold


@pytest.mark.parametrize("min_weight, threshold", [(0.3, 0.5), (0.5, 2.0), (1.0, 0.5)])
def test_sample_weighter_matches_a_per_sample_reference(min_weight, threshold) -> None:
    w = SampleWeighter(min_weight=min_weight, low_loss_threshold=threshold)
    losses = torch.tensor([0.0, 0.1, 0.25, 0.49, 0.5, 0.7, 1.9, 2.0, 5.0, -0.1, float("nan"), float("inf")])
    before = losses.clone()
    weights = w.compute_weights(losses)
    assert weights.shape == losses.shape and weights.dtype == torch.float32
    expected = torch.tensor([reference_weight(float(x), min_weight, threshold) for x in losses])
    torch.testing.assert_close(weights, expected)
    assert torch.equal(losses.nan_to_num(), before.nan_to_num())  # input not modified
    assert bool(((weights >= min_weight) & (weights <= 1.0)).all())


def test_sample_weighter_stats_average_over_calls() -> None:
    w = SampleWeighter(min_weight=0.3, low_loss_threshold=0.5)
    assert w.get_stats() == {"samples": 0, "avg_weight": None, "down_weighted": 0, "down_weighted_share": None}
    a = w.compute_weights(torch.tensor([0.0, 0.25, 3.0]))
    b = w.compute_weights(torch.tensor([[0.1, 1.0], [0.45, 0.6]]))
    every = torch.cat([a.flatten(), b.flatten()])
    stats = w.get_stats()
    assert stats["samples"] == 7
    assert stats["avg_weight"] == pytest.approx(float(every.double().mean()), rel=1e-6)
    assert stats["down_weighted"] == 4
    assert stats["down_weighted_share"] == pytest.approx(4 / 7)


def test_sample_weighter_weights_carry_no_gradient() -> None:
    losses = torch.tensor([0.1, 0.9], requires_grad=True)
    weights = SampleWeighter().compute_weights(losses)
    assert not weights.requires_grad


def test_sample_weighter_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match="tensor"):
        SampleWeighter().compute_weights([0.1, 0.2])


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(min_weight=0.0), ValueError, "min_weight"),
    (dict(min_weight=1.5), ValueError, "min_weight"),
    (dict(low_loss_threshold=0.0), ValueError, "low_loss_threshold"),
    (dict(low_loss_threshold="high"), TypeError, "low_loss_threshold"),
])
def test_sample_weighter_config_errors_name_the_argument(kwargs, exc, field) -> None:
    with pytest.raises(exc, match=names_field(field)):
        SampleWeighter(**kwargs)


# --------------------------------------------------------------------------- ConservativeGCA


def expected_virtual(coherence: float, threshold: float, max_steps: int) -> int:
    """The module docstring's formula."""
    if coherence < threshold or max_steps == 0:
        return 0
    return min(max_steps, 1 + math.floor((coherence - threshold) / (1 - threshold) * max_steps))


def test_gca_update_returns_bool_and_int_and_counts() -> None:
    gca = ConservativeGCA(coherence_threshold=0.95, max_virtual_steps=2, checkpoint_every=5)
    assert gca.get_stats()["updates"] == 0
    g = {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.3])}
    g_before = {k: v.clone() for k, v in g.items()}
    results = [gca.update(g, 1.0) for _ in range(17)]
    for take, n in results:
        assert type(take) is bool and type(n) is int
        assert take == (n > 0)
    # no anchor before the first checkpoint (update 5); a constant gradient is then perfectly coherent
    assert results[:5] == [(False, 0)] * 5
    assert results[5:] == [(True, expected_virtual(1.0, 0.95, 2))] * 12
    stats = gca.get_stats()
    assert stats["updates"] == 17
    assert stats["virtual_steps"] == sum(n for _, n in results) == 24
    assert stats["virtual_share"] == pytest.approx(24 / 17)
    assert stats["checkpoints"] == 3
    assert stats["rollbacks"] == 0
    assert stats["coherence"] == pytest.approx(1.0)
    assert all(torch.equal(g[k], g_before[k]) for k in g)  # the gradient was read, not changed


def test_gca_incoherent_gradients_take_no_virtual_step() -> None:
    gen = torch.Generator().manual_seed(0)
    gca = ConservativeGCA(coherence_threshold=0.95, max_virtual_steps=2, checkpoint_every=5)
    results = [gca.update(torch.randn(1000, generator=gen), 1.0) for _ in range(30)]
    assert results == [(False, 0)] * 30
    stats = gca.get_stats()
    assert stats["virtual_steps"] == 0 and stats["checkpoints"] == 6
    assert stats["coherence"] < 0.95


@pytest.mark.parametrize("threshold, max_steps", [(0.5, 3), (0.0, 1), (0.9, 0)])
def test_gca_number_of_virtual_steps_follows_the_formula(threshold, max_steps) -> None:
    gca = ConservativeGCA(coherence_threshold=threshold, max_virtual_steps=max_steps, checkpoint_every=2)
    for _ in range(2):
        gca.update(torch.ones(4), 1.0)
    n_expected = expected_virtual(1.0, threshold, max_steps)
    assert gca.update(torch.ones(4), 1.0) == (n_expected > 0, n_expected)


def test_gca_signals_a_rollback_when_the_loss_rises_after_virtual_steps() -> None:
    gca = ConservativeGCA(coherence_threshold=0.95, max_virtual_steps=2, checkpoint_every=5, rollback_threshold=1.1)
    g = torch.ones(8)
    results = [gca.update(g, 1.0) for _ in range(7)]
    assert results[-1][0] and gca.get_stats()["virtual_steps"] > 0
    assert gca.update(g, 10.0) == (False, 0)
    assert gca.last_decision.rollback
    assert gca.get_stats()["rollbacks"] == 1


def test_gca_ignores_a_non_finite_loss() -> None:
    gca = ConservativeGCA(checkpoint_every=2)
    gca.update(torch.ones(3), 1.0)
    before = gca.get_stats()
    assert gca.update(torch.ones(3), float("nan")) == (False, 0)
    after = gca.get_stats()
    assert after["updates"] == before["updates"] + 1
    assert {k: v for k, v in after.items() if k != "updates"} == {k: v for k, v in before.items() if k != "updates"}


@pytest.mark.parametrize("kwargs, exc, field", [
    (dict(coherence_threshold=1.5), ValueError, "coherence_threshold"),
    (dict(max_virtual_steps=-1), ValueError, "max_virtual_steps"),
    (dict(max_virtual_steps=1.0), TypeError, "max_virtual_steps"),
    (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
    (dict(rollback_threshold=0.9), ValueError, "rollback_threshold"),
])
def test_gca_config_errors_name_the_argument(kwargs, exc, field) -> None:
    with pytest.raises(exc, match=names_field(field)):
        ConservativeGCA(**kwargs)
