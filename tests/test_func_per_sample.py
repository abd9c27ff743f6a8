"""Tests for ``flashfn.func.per_sample``: per-sample gradients and losses against for-loop references."""

from __future__ import annotations

import torch
from helpers_models import detached, tiny_gpt2, token_batch
from torch import nn
from torch.func import functional_call, grad

from flashfn.core.weighting import weigh_samples, weighted_loss
from flashfn.func import per_sample_grads, per_sample_losses, token_losses_per_sample


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


def _lm_loss(out, ids: torch.Tensor) -> torch.Tensor:
    logits = out.logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _loop_reference(model: nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Per-sample gradients with a plain for loop and ``loss.backward()`` (float64)."""
    out = {k: [] for k, _ in model.named_parameters()}
    for x, y in zip(inputs, targets):
        model.zero_grad()
        loss_fn(model(x.unsqueeze(0)), y.unsqueeze(0)).backward()
        for k, p in model.named_parameters():
            out[k].append(p.grad.detach().clone())
    return {k: torch.stack(v) for k, v in out.items()}


def test_per_sample_grads_mlp_match_loop() -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    got = per_sample_grads(model, detached(model), {}, _ce, x, y)
    ref = _loop_reference(model, _ce, x, y)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == torch.float64 and got[k].shape == (7,) + tuple(dict(model.named_parameters())[k].shape)
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)
    # the samples really differ (a broadcast of one gradient would not)
    assert not torch.allclose(got["0.weight"][0], got["0.weight"][1])


def test_per_sample_grads_chunked_equal() -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    whole = per_sample_grads(model, detached(model), {}, _ce, x, y)
    chunked = per_sample_grads(model, detached(model), {}, _ce, x, y, chunk_size=4)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-12, atol=1e-14)


def test_per_sample_grads_gpt2_match_loop() -> None:
    model = tiny_gpt2(n_layer=2, attn="eager").double()
    ids = token_batch(3, seq=8)
    got = per_sample_grads(model, detached(model), dict(model.named_buffers()), _lm_loss, ids, ids)
    ref = _loop_reference(model, _lm_loss, ids, ids)
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-11)


def test_weighted_sum_of_per_sample_grads_is_grad_of_weighted_loss() -> None:
    model = _mlp()
    g = torch.Generator().manual_seed(3)
    n = 8
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    params = detached(model)

    def losses_of(p: dict) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")

    losses = losses_of(params)
    threshold = float(losses.max()) * 0.8  # some samples under it, at least one over it
    w = weigh_samples(losses, min_weight=0.3, low_loss_threshold=threshold)
    assert float(w.min()) < 1.0 and float(w.max()) == 1.0 and len(set(w.tolist())) > 2

    psg = per_sample_grads(model, params, {}, _ce, x, y)
    ref = grad(lambda p: weighted_loss(losses_of(p), w))(params)
    for k in ref:
        shaped = w.double().reshape((n,) + (1,) * (psg[k].dim() - 1))
        combined = (shaped * psg[k]).sum(dim=0) / n
        torch.testing.assert_close(combined, ref[k], rtol=1e-10, atol=1e-13)
    # unit weights give the plain mean gradient
    plain = grad(lambda p: losses_of(p).mean())(params)
    for k in plain:
        torch.testing.assert_close(psg[k].mean(dim=0), plain[k], rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- #
# per_sample_losses / token_losses_per_sample
# --------------------------------------------------------------------------- #


def test_token_losses_per_sample_match_loop() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, 1] = -100
    labels[1, :] = -100  # a sample with nothing to count
    labels[2, 3:] = -100
    sums, counts = token_losses_per_sample(logits, labels)
    means = per_sample_losses(logits, labels)
    for i in range(3):
        keep = labels[i] != -100
        assert int(counts[i]) == int(keep.sum())
        if keep.any():
            terms = nn.functional.cross_entropy(logits[i][keep], labels[i][keep], reduction="none")
            torch.testing.assert_close(sums[i], terms.sum(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(means[i], terms.mean(), rtol=1e-6, atol=1e-6)
        else:
            assert float(sums[i]) == 0.0 and float(means[i]) == 0.0


def test_per_sample_losses_one_target_per_sample() -> None:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, generator=g)
    labels = torch.tensor([0, 5, -100, 2])
    got = per_sample_losses(logits, labels)
    for i in range(4):
        if labels[i] == -100:
            assert float(got[i]) == 0.0
        else:
            torch.testing.assert_close(got[i], nn.functional.cross_entropy(logits[i:i + 1], labels[i:i + 1]))


def test_per_sample_losses_custom_ignore_index_and_half_logits() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[1, 0, 3, 0], [2, 2, 0, 4]])
    got = per_sample_losses(logits.to(torch.bfloat16), labels, ignore_index=0)
    assert got.dtype == torch.float32
    for i in range(2):
        keep = labels[i] != 0
        ref = nn.functional.cross_entropy(logits[i][keep].to(torch.bfloat16).float(), labels[i][keep])
        torch.testing.assert_close(got[i], ref, rtol=1e-6, atol=1e-6)
