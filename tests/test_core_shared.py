"""The shared suite, run over every component of ``flashfn.core``.

For each ``(init, update)`` pair: the state's tree structure and the dtype and
shape of every leaf stay the same across updates, the inputs (state included)
are not modified, the same inputs give identical outputs, and the new state
shares no storage with the inputs. For every public function: inputs not
modified, deterministic. Every state is a pytree for both ``optree`` and
``torch.utils._pytree`` (what ``torch.func`` uses).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, NamedTuple, Tuple

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import flashfn.core as core
from flashfn.config import FlashConfig
from flashfn.core import flash
from flashfn.core._util import (
    flatten,
    unflatten,
)
from flashfn.core.alas import (
    alas_init,
    alas_update,
    interpolate,
    layer_heat,
    reset_activity,
    should_backward,
    state_nbytes,
)
from flashfn.core.gca import gca_init, gca_reset, gca_update
from flashfn.core.pruning import memory_init, memory_update, prune_samples
from flashfn.core.safety import is_active, is_honest_step, safety_init, safety_update
from flashfn.core.stepback import is_stepped_back, step_back_messages, stepback_init, stepback_update
from flashfn.core.weighting import weigh_samples, weighted_loss, weighting_init, weighting_update

Tensor = torch.Tensor
N_UPDATES = 8


# --------------------------------------------------------------------------- #
# Helpers: exact, NaN-aware comparison of pytrees
# --------------------------------------------------------------------------- #


def same_tensor(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` that also holds for NaNs in the same places (and checks dtype and shape)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return torch.equal(a, b)


def tree_equal(a: Any, b: Any) -> bool:
    """Same structure and identical leaves (tensors compared exactly, other leaves with ``==``)."""
    leaves_a, spec_a = optree.tree_flatten(a)
    leaves_b, spec_b = optree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor) and same_tensor(x, y)):
                return False
        elif x != y:
            return False
    return True


def clone_tree(tree: Any) -> Any:
    return optree.tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, tree)


def leaf_meta(tree: Any) -> list:
    leaves = optree.tree_leaves(tree)
    return [(type(x), x.dtype, tuple(x.shape)) if isinstance(x, Tensor) else (type(x),) for x in leaves]


def scribble(tree: Any) -> None:
    """Modify every floating tensor of ``tree`` in place."""
    for x in optree.tree_leaves(tree):
        if isinstance(x, Tensor) and x.is_floating_point():
            x.add_(1.0)


# --------------------------------------------------------------------------- #
# The components, as (init, inputs of update i, update)
# --------------------------------------------------------------------------- #


class Component(NamedTuple):
    init: Callable[[], Any]
    inputs: Callable[[int, Any], Tuple[tuple, Dict[str, Any]]]  # (i, state) -> (args, kwargs) after the state
    update: Callable[..., Any]  # (state, *args, **kwargs) -> new state


def _gen(i: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + i)


LAYER_SHAPES = (((3, 2), (2,)), ((4,),), ((2, 2),))


def _layer_params() -> tuple:
    g = _gen(-1)
    return tuple(tuple(torch.randn(s, generator=g) for s in layer) for layer in LAYER_SHAPES)


def _layer_grads(i: int) -> tuple:
    """Step ``i``'s gradients: some layers skipped, one non-finite now and then."""
    g = _gen(i)
    out = []
    for j, layer in enumerate(LAYER_SHAPES):
        grads = tuple(torch.randn(s, generator=g) for s in layer)
        if (i + j) % 4 == 3:
            out.append(None)
        elif i == 5 and j == 0:
            out.append((grads[0].clone().fill_(float("nan")), grads[1]))
        else:
            out.append(grads)
    return tuple(out)


def _alas() -> Component:
    params = _layer_params()
    return Component(
        init=lambda: alas_init(params),
        inputs=lambda i, s: ((_layer_grads(i), params),
                             dict(min_activity=0.3, activity_decay=0.9, interp_decay=0.8, trend_weight=0.2)),
        update=alas_update,
    )


def _gca_grad(i: int) -> dict:
    g = _gen(i)
    base = {"w": torch.ones(3, 2), "b": torch.full((2,), -1.0)}
    grad = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    if i == 6:
        grad["b"][0] = float("inf")
    return grad


def _gca_loss(i: int) -> Tensor:
    return torch.tensor(1.0 + 0.3 * (i % 3) if i != 4 else float("nan"))


def _gca() -> Component:
    return Component(
        init=lambda: gca_init({"w": torch.zeros(3, 2), "b": torch.zeros(2)}),
        inputs=lambda i, s: ((_gca_grad(i), _gca_loss(i)),
                             dict(coherence_threshold=0.5, max_virtual_steps=2, checkpoint_every=3,
                                  smoothing=0.5, rollback_threshold=1.1, allow_virtual=True)),
        update=lambda s, *a, **k: gca_update(s, *a, **k)[0],
    )


def _safety() -> Component:
    losses = [1.0, 1.0, 1.0, 2.0, 2.5, float("nan"), 3.0, 1.0]
    return Component(
        init=safety_init,
        inputs=lambda i, s: ((torch.tensor(losses[i]),),
                             dict(warmup_steps=2, loss_spike_threshold=1.1, auto_disable_on_spike=True,
                                  spike_cooldown_steps=3)),
        update=lambda s, *a, **k: safety_update(s, *a, **k)[0],
    )


def _weighting() -> Component:
    def inputs(i, s):
        w = torch.rand(5, generator=_gen(i)) + 0.2
        if i == 3:
            w[1] = float("nan")
        return (w,), {}

    return Component(init=weighting_init, inputs=inputs, update=weighting_update)


FLASH_CFG = FlashConfig(warmup_steps=2, honest_check_every=3, gca_checkpoint_every=2, coherence_threshold=0.0,
                        max_consecutive_skips=2, spike_cooldown_steps=2)


def _flash() -> Component:
    params = _layer_params()
    other = (torch.randn(5, generator=_gen(-2)),)

    def inputs(i, s):
        u = torch.rand(len(LAYER_SHAPES), generator=_gen(50 + i), dtype=torch.float64)
        plan = flash.plan_step(s, FLASH_CFG, u=u)
        full = _layer_grads(i)
        grads = tuple(g if c else None for g, c in zip(full, plan.compute.tolist()))
        other_grads = tuple(torch.randn(p.shape, generator=_gen(70 + i)) for p in other)
        loss = torch.tensor([1.0, 1.0, 0.9, 3.0, 3.0, 1.0, float("nan"), 1.0][i])
        weights = torch.rand(4, generator=_gen(90 + i)) if plan.weigh else None
        return (FLASH_CFG, plan, grads, params, loss), dict(other_grads=other_grads, weights=weights)

    return Component(
        init=lambda: flash.flash_init(params, other),
        inputs=inputs,
        update=lambda s, *a, **k: flash.flash_update(s, *a, **k)[0],
    )


COMPONENTS = {"alas": _alas, "gca": _gca, "safety": _safety, "weighting": _weighting, "flash": _flash}


@pytest.fixture(params=sorted(COMPONENTS))
def component(request) -> Component:
    return COMPONENTS[request.param]()


# --------------------------------------------------------------------------- #
# The shared properties of every (init, update) pair
# --------------------------------------------------------------------------- #


def test_structure_and_leaf_dtypes_stable(component: Component) -> None:
    state = component.init()
    spec, meta = optree.tree_structure(state), leaf_meta(state)
    assert all(isinstance(x, Tensor) for x in optree.tree_leaves(state))
    for i in range(N_UPDATES):
        args, kwargs = component.inputs(i, state)
        state = component.update(state, *args, **kwargs)
        assert optree.tree_structure(state) == spec, f"update {i} changed the state's structure"
        assert leaf_meta(state) == meta, f"update {i} changed a leaf's dtype or shape"


def test_inputs_not_modified(component: Component) -> None:
    state = component.init()
    for i in range(N_UPDATES):
        args, kwargs = component.inputs(i, state)
        before = clone_tree((state, args, kwargs))
        new = component.update(state, *args, **kwargs)
        assert tree_equal((state, args, kwargs), before), f"update {i} modified its inputs"
        state = new


def test_deterministic(component: Component) -> None:
    def run():
        state, trace = component.init(), []
        for i in range(N_UPDATES):
            args, kwargs = component.inputs(i, state)
            state = component.update(state, *args, **kwargs)
            trace.append(state)
        return trace

    assert tree_equal(run(), run())


def test_same_inputs_same_output(component: Component) -> None:
    state = component.init()
    for i in range(N_UPDATES):
        args, kwargs = component.inputs(i, state)
        a = component.update(state, *args, **kwargs)
        b = component.update(state, *args, **kwargs)
        assert tree_equal(a, b)
        state = a


def test_new_state_shares_no_storage_with_inputs(component: Component) -> None:
    state = component.init()
    for i in range(N_UPDATES):
        args, kwargs = component.inputs(i, state)
        new = component.update(state, *args, **kwargs)
        kept = clone_tree(new)
        scribble((args, kwargs))  # the caller reuses its buffers
        assert tree_equal(new, kept), f"the state after update {i} aliases an input"
        state = new


# --------------------------------------------------------------------------- #
# Pytrees: optree and torch.utils._pytree (torch.func) round trips
# --------------------------------------------------------------------------- #


def _all_states() -> dict:
    out = {}
    for name, make in COMPONENTS.items():
        c = make()
        s = c.init()
        for i in range(3):
            args, kwargs = c.inputs(i, s)
            s = c.update(s, *args, **kwargs)
        out[name] = s
    out["gca_decision"] = gca_update(gca_init(torch.zeros(2)), torch.ones(2), 1.0)[1]
    out["safety_events"] = safety_update(safety_init(), 1.0)[1]
    return out


@pytest.mark.parametrize("name", sorted(_all_states()))
def test_optree_round_trip(name: str) -> None:
    state = _all_states()[name]
    leaves, spec = optree.tree_flatten(state)
    back = optree.tree_unflatten(spec, leaves)
    assert type(back) is type(state)
    assert tree_equal(back, state)
    mapped = optree.tree_map(lambda x: x, state)
    assert type(mapped) is type(state) and tree_equal(mapped, state)


@pytest.mark.parametrize("name", sorted(_all_states()))
def test_torch_pytree_round_trip(name: str) -> None:
    state = _all_states()[name]
    leaves, spec = torch_pytree.tree_flatten(state)
    assert len(leaves) == len(optree.tree_leaves(state))
    back = torch_pytree.tree_unflatten(leaves, spec)
    assert type(back) is type(state)
    assert tree_equal(back, state)
    if all(isinstance(x, Tensor) for x in leaves):
        doubled = torch_pytree.tree_map(lambda x: x.clone(), state)
        assert type(doubled) is type(state) and tree_equal(doubled, state)


@pytest.mark.parametrize("name", ["alas", "gca", "safety", "weighting", "flash"])
def test_state_types_are_namedtuples(name: str) -> None:
    state = _all_states()[name]
    assert isinstance(state, tuple) and hasattr(type(state), "_fields")
    with pytest.raises(AttributeError):
        state.step = torch.zeros(())  # type: ignore[misc]


# --------------------------------------------------------------------------- #
# Every public function: inputs not modified, deterministic
# --------------------------------------------------------------------------- #


def _trained(component):
    """The state of ``component`` after four updates."""
    c = component()
    s = c.init()
    for i in range(4):
        args, kwargs = c.inputs(i, s)
        s = c.update(s, *args, **kwargs)
    return s


def _trained_alas():
    return _trained(_alas)


def _trained_flash():
    return _trained(_flash)


def _calls() -> dict:
    """name -> () -> (function, args, kwargs)."""
    alas_s = _trained_alas()
    flash_c = _flash()
    gca_s = _trained(_gca)
    safety_s = _trained(_safety)
    flash_s = _trained_flash()
    params = _layer_params()
    losses = torch.tensor([0.0, 0.2, 0.7, float("nan"), 3.0])
    weights = weigh_samples(losses)
    f_args, f_kwargs = flash_c.inputs(4, flash_s)
    return {
        "alas_init": (alas_init, (params,), dict(history_dtype=torch.float64)),
        "alas_update": (alas_update, (alas_s, _layer_grads(7), params), {}),
        "should_backward": (should_backward, (alas_s,), dict(seed=3)),
        "interpolate": (interpolate, (alas_s, (0, 1, 2)), dict(noise_scale=0.1, seed=5)),
        "reset_activity": (reset_activity, (alas_s,), {}),
        "layer_heat": (layer_heat, (_layer_grads(1)[0], params[0]), {}),
        "state_nbytes": (state_nbytes, (alas_s,), {}),
        "flatten": (flatten, ((torch.ones(2, 3), torch.arange(4.0)),), dict(dtype=torch.float64)),
        "unflatten": (unflatten, (torch.arange(10.0), (torch.ones(2, 3), torch.ones(4, dtype=torch.float64))), {}),
        "gca_init": (gca_init, ({"w": torch.ones(2, 2)},), {}),
        "gca_update": (gca_update, (gca_s, _gca_grad(9), torch.tensor(1.2)), dict(checkpoint_every=3)),
        "gca_reset": (gca_reset, (gca_s,), {}),
        "safety_init": (safety_init, (), {}),
        "safety_update": (safety_update, (safety_s, torch.tensor(4.0)), dict(warmup_steps=1)),
        "is_active": (is_active, (safety_s,), dict(warmup_steps=1)),
        "is_honest_step": (is_honest_step, (7,), dict(warmup_steps=2, honest_check_every=5)),
        "weighting_init": (weighting_init, (), {}),
        "weighting_update": (weighting_update, (weighting_init(), weights), {}),
        "weigh_samples": (weigh_samples, (losses,), dict(min_weight=0.2, low_loss_threshold=1.0)),
        "weighted_loss": (weighted_loss, (losses.nan_to_num(), weights), dict(normaliser=torch.tensor(7.0))),
        "flash_init": (flash.flash_init, (params, (torch.ones(3),)), {}),
        "plan_step": (flash.plan_step, (flash_s, FLASH_CFG), dict(u=torch.full((3,), 0.5, dtype=torch.float64))),
        "flash_update": (flash.flash_update, (flash_s, *f_args), f_kwargs),
        "component_on": (flash.component_on, (flash_s, FLASH_CFG, "gca"), {}),
        "uses_history": (flash.uses_history, (FLASH_CFG,), {}),
        "history_dtype_of": (flash.history_dtype_of, ("bfloat16",), {}),
        "memory_init": (memory_init, (5,), {}),
        "memory_update": (memory_update, (memory_init(5), torch.tensor([1, 3]), torch.tensor([0.2, 2.0])), {}),
        "prune_samples": (prune_samples, (memory_update(memory_init(5), torch.arange(5), torch.arange(5.0)),
                                          torch.arange(5)), dict(prune_ratio=0.5, seed=2, step=3)),
        "stepback_init": (stepback_init, (), {}),
        "stepback_update": (stepback_update, (stepback_init(), 3), dict(step_back_after=1, weighting_saved_work=False,
                                                                       gca_window_virtual=2)),
        "is_stepped_back": (is_stepped_back, (stepback_init(), "alas"), {}),
        "step_back_messages": (step_back_messages, (stepback_init(), flash_s.stepback, FLASH_CFG), {}),
    }


def _public_functions() -> set:
    names = set()
    for module, exported in ((core, core.__all__), (flash, flash.__all__)):
        for n in exported:
            obj = getattr(module, n)
            if inspect.isfunction(obj):
                names.add(n)
    return names


def test_every_public_function_is_covered() -> None:
    assert _public_functions() == set(_calls())


@pytest.mark.parametrize("name", sorted(_calls()))
def test_public_function_pure(name: str) -> None:
    fn, args, kwargs = _calls()[name]
    before = clone_tree((args, kwargs))
    out1 = fn(*args, **kwargs)
    assert tree_equal((args, kwargs), before), f"{name} modified its inputs"
    out2 = fn(*clone_tree(args), **clone_tree(kwargs))
    assert tree_equal(out1, out2), f"{name} is not deterministic"
