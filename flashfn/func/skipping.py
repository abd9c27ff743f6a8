"""Skipping the backward work of chosen layers, for real.

Two mechanisms (``FlashConfig.alas_mechanism``):

- ``"branch"`` (default): a skipped residual block runs its forward under
  ``torch.no_grad()`` and its output is rewritten as
  ``x + (block(x) - x).detach()``: the value is unchanged, the gradient flows
  through the identity path only, so the block's whole backward (weight *and*
  input gradients) is not done and no activation of it is kept. The gradient
  that reaches the layers below loses the block's Jacobian (DropBP, Woo et
  al., 2024, arXiv 2402.17812).
- ``"freeze"``: the skipped layer's parameters are not differentiated
  (``requires_grad=False`` for a module run, or left out of the differentiated
  subset under ``torch.func.grad``): its weight-gradient work is saved, the
  input gradient is still computed, so the layers below get exact gradients.

Measured on a 6-block GPT-2 (``benchmarks/skip_mechanisms.py``), the branch
mechanism saves several times more step time per skipped block; see
``docs/design.md``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Set

import torch
from torch import nn

from .layers import LayerMap

__all__ = ["BlockSkipper"]


def _hidden_in(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return kwargs.get("hidden_states")


class BlockSkipper:
    """Hooks on every layer of a model that skip the backward of the layers named by :meth:`set`.

    The hooks are installed once and cost one set lookup per block call when
    nothing is skipped. This is the one stateful piece the functional step
    needs: it sits between the model and ``torch.func``.

    Args:
        model: the model.
        lmap: its layer map.
        mechanism: ``"branch"`` or ``"freeze"``.

    Example:
        >>> from torch import nn
        >>> from flashfn.func import find_layers
        >>> m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(2)])
        >>> sk = BlockSkipper(m, find_layers(m, ["0", "1"]), "branch")
        >>> sk.set([1]); sk.skipped
        frozenset({1})
        >>> sk.remove()
    """

    def __init__(self, model: nn.Module, lmap: LayerMap, mechanism: str = "branch") -> None:
        if mechanism not in ("branch", "freeze"):
            raise ValueError(f"mechanism must be 'branch' or 'freeze', got {mechanism!r}")
        self.model = model
        self.lmap = lmap
        self.mechanism = mechanism
        self._skipped: Set[int] = set()
        self._frozen: List[nn.Parameter] = []
        self._grad_mode: List[bool] = []
        self._handles: list = []
        modules = dict(model.named_modules())
        self._params = dict(model.named_parameters())
        if mechanism == "branch":
            for i, path in enumerate(lmap.names):
                mod = modules[path]
                self._handles.append(mod.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post(i), with_kwargs=True, always_call=True))

    @property
    def skipped(self) -> frozenset:
        """Indices of the layers skipped now."""
        return frozenset(self._skipped)

    def set(self, layers: Sequence[int], *, toggle_requires_grad: bool = True) -> None:
        """Skip the backward of ``layers`` from now on (until the next :meth:`set`).

        With the ``"freeze"`` mechanism and ``toggle_requires_grad``, the
        layers' parameters get ``requires_grad=False`` (restored by the next
        call); a ``torch.func`` step passes ``False`` and differentiates a
        subset instead.
        """
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        self._skipped = {int(i) for i in layers}
        if self.mechanism == "freeze" and toggle_requires_grad:
            for i in sorted(self._skipped):
                for name in self.lmap.params[i]:
                    p = self._params[name]
                    if p.requires_grad:
                        p.requires_grad_(False)
                        self._frozen.append(p)

    def clear(self) -> None:
        """Skip nothing."""
        self.set(())

    def remove(self) -> None:
        """Skip nothing and take the hooks off the model."""
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- hooks (branch mechanism) ---
    def _pre(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if i in self._skipped:
                self._grad_mode.append(torch.is_grad_enabled())
                torch.set_grad_enabled(False)
            return None

        return hook

    def _post(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Optional[Any]:
            if i not in self._skipped or not self._grad_mode:
                return None
            torch.set_grad_enabled(self._grad_mode.pop())
            x = _hidden_in(args, kwargs)
            y = output[0] if isinstance(output, tuple) else output
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape):
                raise TypeError(
                    f"ALAS 'branch' skipping needs a residual block whose first input and output are hidden states "
                    f"of one shape; {self.lmap.names[i]!r} ({type(module).__name__}) is not. "
                    "Use FlashConfig(alas_mechanism='freeze') or pass FlashConfig(layers=[...])."
                )
            if not x.requires_grad:
                return None
            new = x + (y - x.detach()).detach()
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook
