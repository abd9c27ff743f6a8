"""InfoBatch-style pruning: who is dropped, the weights that keep the gradient unbiased, and the loss memory."""

from __future__ import annotations

import pytest
import torch

from flashfn.core.flash import StepPlan
from flashfn.core.pruning import memory_init, memory_update, prune_samples
from flashfn.func import find_layers, masked_value_and_grad


def _memory(losses):
    return memory_update(memory_init(len(losses)), torch.arange(len(losses)), torch.tensor(losses))


def test_only_samples_below_the_mean_remembered_loss_are_dropped() -> None:
    mem = _memory([0.1, 0.2, 0.3, 5.0, 6.0, float("nan")])  # mean of the finite ones: 2.32
    dropped_any = set()
    for step in range(50):
        keep, w, mem = prune_samples(mem, torch.arange(6), prune_ratio=0.5, seed=1, step=step)
        assert keep[3:].all()  # high-loss and never-seen (NaN) samples are always kept
        dropped_any |= {i for i in range(3) if not keep[i]}
        assert torch.equal(w, torch.where(torch.arange(6)[keep] < 3, 2.0, 1.0))
    assert dropped_any == {0, 1, 2}
    assert int(mem.kept) + int(mem.pruned) == 50 * 6


def test_expected_loss_is_unbiased() -> None:
    """Averaged over the draws, the pruned weighted loss with the original normaliser equals the plain mean."""
    losses = torch.tensor([0.05, 0.1, 0.2, 0.4, 3.0, 4.0, 5.0, 6.0])
    mem = _memory(losses.tolist())
    total, n = 0.0, 4000
    for step in range(n):
        keep, w, _ = prune_samples(mem, torch.arange(8), prune_ratio=0.5, seed=0, step=step)
        total += float((w * losses[keep]).sum() / 8)
    assert total / n == pytest.approx(float(losses.mean()), rel=0.01)


def test_draws_depend_on_seed_and_step_only() -> None:
    mem = _memory([0.1] * 6 + [9.0] * 6)
    a = prune_samples(mem, torch.arange(12), prune_ratio=0.5, seed=3, step=7)[0]
    b = prune_samples(mem, torch.arange(12), prune_ratio=0.5, seed=3, step=7)[0]
    c = prune_samples(mem, torch.arange(12), prune_ratio=0.5, seed=4, step=7)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_memory_ignores_non_finite_losses_and_is_pure() -> None:
    mem = memory_init(4)
    new = memory_update(mem, torch.tensor([0, 1]), torch.tensor([float("inf"), 0.5]))
    assert mem.losses.isnan().all()  # the input state is not modified
    assert new.losses[0].isnan() and float(new.losses[1]) == 0.5
    with pytest.raises(ValueError, match="indices"):
        memory_update(mem, torch.tensor([0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="prune_ratio"):
        prune_samples(mem, torch.arange(2), prune_ratio=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        memory_init(0)


def test_masked_value_and_grad_uses_the_weights_and_the_original_normaliser() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    lmap = find_layers(model, ["0", "1"])
    x, y = torch.randn(4, 3), torch.randn(4, 3)

    def per_sample_loss(p, b, batch):
        xb, yb = batch
        return ((torch.func.functional_call(model, (p, b), (xb,)) - yb) ** 2).mean(-1)

    plan = StepPlan(active=True, honest=True, compute=torch.ones(2, dtype=torch.bool), weigh=False)
    w = torch.tensor([2.0, 1.0, 1.0])
    keep = torch.tensor([0, 2, 3])
    grads, loss, aux = masked_value_and_grad(per_sample_loss, params, buffers, (x[keep], y[keep]), lmap=lmap,
                                             plan=plan, sample_weights=w, normaliser=4.0)
    expected = torch.func.grad(lambda p: (w * per_sample_loss(p, buffers, (x[keep], y[keep]))).sum() / 4.0)(
        {k: v.detach() for k, v in params.items()})
    for k in expected:
        torch.testing.assert_close(grads[k], expected[k])
    assert aux.losses.shape == (3,)
