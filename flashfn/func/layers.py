"""The layer map: which parameters make up each ALAS layer of a model."""

from __future__ import annotations

import re
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["LayerMap", "find_layers", "split_by_layer", "join_layers"]


class LayerMap(NamedTuple):
    """ALAS layers of a model.

    Attributes:
        names: module path of each layer (e.g. ``"transformer.h.3"``).
        params: for each layer, the names (as in ``model.named_parameters()``)
            of its parameters.
        others: the parameters outside every layer; they always get honest gradients.
    """

    names: Tuple[str, ...]
    params: Tuple[Tuple[str, ...], ...]
    others: Tuple[str, ...]

    def __len__(self) -> int:  # number of layers
        return len(self.names)

    def layer_of(self, param_name: str) -> Optional[int]:
        """Index of the layer holding ``param_name`` (a parameter name, or a layer's own module path), or ``None``."""
        for i, (name, params) in enumerate(zip(self.names, self.params)):
            if param_name == name or param_name in params:
                return i
        return None


def _block_lists(model: nn.Module) -> Dict[str, nn.ModuleList]:
    """Every ``nn.ModuleList`` of >= 2 modules of one class that hold parameters."""
    found = {}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and all(any(True for _ in m.parameters()) for m in mod):
                found[path] = mod
    return found


def find_layers(model: nn.Module, layers: Optional[Sequence[str]] = None) -> LayerMap:
    """The ALAS layers of ``model``.

    With ``layers`` given, each entry is a module path (``"encoder.layer.0"``)
    or a regular expression matched in full against module paths
    (``r"encoder\\.layer\\.\\d+"``). Otherwise the repeated blocks are
    auto-detected: the ``nn.ModuleList`` of identical modules holding the most
    parameters (``transformer.h``, ``encoder.layer``, ``model.layers``, ...),
    each of its elements a layer. A parameter shared between a layer and
    anything else (tied weights) is left out of the layer. A model with no
    such list gets an empty map (ALAS has nothing to skip).

    Args:
        model: the model.
        layers: explicit module paths or patterns, optional.

    Returns:
        A ``LayerMap``.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
        >>> find_layers(m).names
        ('1.0', '1.1', '1.2')
    """
    modules = dict(model.named_modules())
    if layers is not None:
        paths = []
        for entry in layers:
            if entry in modules:
                paths.append(entry)
                continue
            pat = re.compile(entry)
            hits = [p for p in modules if p and pat.fullmatch(p)]
            if not hits:
                raise ValueError(f"layers: {entry!r} matches no module of {type(model).__name__}")
            paths.extend(hits)
        paths = list(dict.fromkeys(paths))
    else:
        lists = _block_lists(model)
        if not lists:
            return LayerMap((), (), tuple(n for n, _ in model.named_parameters()))

        def size(ml: nn.ModuleList) -> int:
            return sum(p.numel() for p in ml.parameters())

        best = max(lists, key=lambda k: size(lists[k]))
        paths = [f"{best}.{i}" if best else str(i) for i in range(len(lists[best]))]
    owner: Dict[int, set] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owner.setdefault(id(p), set()).add(path)
    all_params = dict(model.named_parameters())
    per_layer = []
    taken = set()
    for path in paths:
        prefix = path + "."
        names = []
        for name, p in all_params.items():
            if not name.startswith(prefix) or name in taken:
                continue
            if all(o == path or o.startswith(prefix) for o in owner[id(p)]):
                names.append(name)
        if not names:
            raise ValueError(f"layers: module {path!r} has no parameters of its own")
        taken.update(names)
        per_layer.append(tuple(names))
    others = tuple(n for n in all_params if n not in taken)
    return LayerMap(tuple(paths), tuple(per_layer), others)


def split_by_layer(lmap: LayerMap, tree: Dict[str, torch.Tensor]) -> Tuple[Tuple[torch.Tensor, ...], ...]:
    """A ``{name: tensor}`` dict as the core's per-layer tuples (missing names are an error)."""
    return tuple(tuple(tree[n] for n in names) for names in lmap.params)


def join_layers(
    lmap: LayerMap, layers: Sequence[int], values: Sequence[Sequence[torch.Tensor]]
) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`split_by_layer` for the given layer indices."""
    out = {}
    for i, vals in zip(layers, values):
        out.update(zip(lmap.params[i], vals))
    return out
