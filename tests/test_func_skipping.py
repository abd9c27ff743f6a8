"""Tests for ``flashfn.func.skipping``: ``BlockSkipper`` really skips backward work on a module run.

The skipped layers come from an ALAS plan (``StepPlan.skipped``); savings are
measured as the floating-point operations of the backward
(``torch.utils.flop_counter.FlopCounterMode``), never as time.
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch
from helpers_models import tiny_bert_cls, tiny_gpt2, token_batch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flashfn.core.flash import StepPlan
from flashfn.func import BlockSkipper, find_layers

N_LAYER = 4
LOWER = "transformer.h.0."  # below the skipped blocks
UPPER = "transformer.h.3."  # above them


def _plan(compute: list) -> StepPlan:
    c = torch.tensor(compute, dtype=torch.bool)
    return StepPlan(active=True, honest=bool(c.all()), compute=c, weigh=False)


PLAN = _plan([True, False, True, True])  # ALAS skips block 1


class _Run:
    def __init__(self, logits: torch.Tensor, grads: Dict[str, Optional[torch.Tensor]], flops: int) -> None:
        self.logits, self.grads, self.flops = logits, grads, flops


def _run(mechanism: Optional[str], plan: StepPlan, model: Optional[nn.Module] = None) -> _Run:
    """One forward + ``loss.backward()`` of a fresh tiny GPT-2 (same init), skipping ``plan.skipped``."""
    m = tiny_gpt2(N_LAYER) if model is None else model
    skipper = None
    if mechanism is not None:
        skipper = BlockSkipper(m, find_layers(m), mechanism)
        skipper.set(plan.skipped)
    ids = token_batch(4)
    out = m(ids, labels=ids)
    counter = FlopCounterMode(display=False)
    with counter:
        out.loss.backward()
    if skipper is not None:
        skipper.remove()
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in m.named_parameters()}
    return _Run(out.logits.detach(), grads, counter.get_total_flops())


@pytest.fixture(scope="module")
def runs() -> Dict[str, _Run]:
    torch.set_num_threads(1)
    return {"honest": _run(None, PLAN), "branch": _run("branch", PLAN), "freeze": _run("freeze", PLAN)}


def _names(prefix: str, grads: dict) -> list:
    names = [k for k in grads if k.startswith(prefix)]
    assert names
    return names


def test_plan_skips_block_one() -> None:
    assert PLAN.skipped == (1,)


@pytest.mark.parametrize("mechanism", ["branch", "freeze"])
def test_skipped_block_gets_no_gradient(runs, mechanism: str) -> None:
    grads = runs[mechanism].grads
    for k in _names("transformer.h.1.", grads):
        assert grads[k] is None, k
    for prefix in ("transformer.h.0.", "transformer.h.2.", "transformer.h.3.", "transformer.wte", "transformer.ln_f"):
        for k in _names(prefix, grads):
            assert grads[k] is not None, k
    honest = runs["honest"].grads
    assert all(g is not None for g in honest.values())


def test_backward_flops_drop(runs) -> None:
    honest, branch, freeze = runs["honest"].flops, runs["branch"].flops, runs["freeze"].flops
    assert honest > 0
    assert branch < freeze < honest
    # "branch" drops the block's whole backward (weight and input gradients, attention included),
    # "freeze" only its weight gradients: the branch saving is clearly the larger
    assert honest - branch > (honest - freeze) * 1.5


@pytest.mark.parametrize("mechanism", ["branch", "freeze"])
def test_forward_value_unchanged(runs, mechanism: str) -> None:
    torch.testing.assert_close(runs[mechanism].logits, runs["honest"].logits, rtol=1e-5, atol=1e-5)


def test_freeze_keeps_lower_gradients_exact(runs) -> None:
    honest, freeze = runs["honest"].grads, runs["freeze"].grads
    for k in _names(LOWER, honest) + ["transformer.wpe.weight"]:
        assert torch.equal(freeze[k], honest[k]), k


def test_branch_changes_lower_gradients(runs) -> None:
    honest, branch = runs["honest"].grads, runs["branch"].grads
    lower = _names(LOWER, honest) + ["transformer.wpe.weight"]
    diffs = [float((branch[k] - honest[k]).abs().max()) for k in lower]
    assert max(diffs) > 1e-3  # the skipped block's Jacobian is missing from what reaches block 0
    assert not all(torch.allclose(branch[k], honest[k], rtol=1e-3, atol=1e-5) for k in lower)


def test_branch_keeps_upper_gradients(runs) -> None:
    honest, branch = runs["honest"].grads, runs["branch"].grads
    for k in _names(UPPER, honest) + ["transformer.ln_f.weight"]:
        torch.testing.assert_close(branch[k], honest[k], rtol=1e-4, atol=1e-6)


def test_more_skipped_blocks_save_more() -> None:
    one = _run("branch", _plan([True, False, True, True])).flops
    three = _run("branch", _plan([True, False, False, False])).flops
    assert three < one


# --------------------------------------------------------------------------- #
# State of the skipper
# --------------------------------------------------------------------------- #


def test_freeze_restores_requires_grad() -> None:
    m = tiny_gpt2(2)
    lmap = find_layers(m)
    sk = BlockSkipper(m, lmap, "freeze")
    params = dict(m.named_parameters())
    sk.set([1])
    assert sk.skipped == frozenset({1})
    assert not any(params[n].requires_grad for n in lmap.params[1])
    assert all(params[n].requires_grad for n in lmap.params[0])
    sk.set([0])
    assert all(params[n].requires_grad for n in lmap.params[1])
    assert not any(params[n].requires_grad for n in lmap.params[0])
    sk.set([1], toggle_requires_grad=False)
    assert all(p.requires_grad for p in m.parameters())
    sk.set([0])
    sk.clear()
    assert sk.skipped == frozenset()
    assert all(p.requires_grad for p in m.parameters())


def test_freeze_does_not_unfreeze_a_user_frozen_parameter() -> None:
    m = tiny_gpt2(2)
    lmap = find_layers(m)
    user_frozen = dict(m.named_parameters())[lmap.params[1][0]]
    user_frozen.requires_grad_(False)
    sk = BlockSkipper(m, lmap, "freeze")
    sk.set([1])
    sk.clear()
    assert not user_frozen.requires_grad
    assert all(p.requires_grad for p in m.parameters() if p is not user_frozen)


@pytest.mark.parametrize("mechanism", ["branch", "freeze"])
def test_after_remove_backward_is_honest_again(runs, mechanism: str) -> None:
    m = tiny_gpt2(N_LAYER)
    sk = BlockSkipper(m, find_layers(m), mechanism)
    sk.set([1, 2])
    sk.remove()
    again = _run(None, PLAN, model=m)
    assert again.flops == runs["honest"].flops
    for k, g in runs["honest"].grads.items():
        assert torch.equal(again.grads[k], g), k


def test_branch_on_bert() -> None:
    m = tiny_bert_cls(n_layer=3)
    lmap = find_layers(m)
    ids = token_batch(4)
    labels = torch.tensor([0, 1, 2, 1])
    honest = m(ids, labels=labels)
    sk = BlockSkipper(m, lmap, "branch")
    sk.set([1])
    out = m(ids, labels=labels)
    out.loss.backward()
    sk.remove()
    torch.testing.assert_close(out.logits, honest.logits, rtol=1e-5, atol=1e-5)
    params = dict(m.named_parameters())
    assert all(params[n].grad is None for n in lmap.params[1])
    assert all(params[n].grad is not None for n in lmap.params[0] + lmap.params[2])


def test_branch_needs_a_residual_block() -> None:
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    sk = BlockSkipper(m, find_layers(m, ["0", "1"]), "branch")
    sk.set([0])
    with pytest.raises(TypeError, match="'0'"):
        m(torch.randn(2, 4, requires_grad=True))
    sk.remove()


def test_bad_mechanism() -> None:
    m = tiny_gpt2(2)
    with pytest.raises(ValueError, match="mechanism"):
        BlockSkipper(m, find_layers(m), "drop")
