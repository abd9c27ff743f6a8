"""Tests for ``flashfn.func.layers``: the layer map (``find_layers``, ``LayerMap``, split/join)."""

from __future__ import annotations

import re

import pytest
from helpers_models import tiny_bert_cls, tiny_gpt2, tiny_llama
from torch import nn

from flashfn.func import LayerMap, find_layers, join_layers, split_by_layer


def _block_param_names(model: nn.Module, path: str) -> tuple:
    """Names of the parameters under module ``path``, as ``model.named_parameters()`` spells them (independent)."""
    return tuple(n for n, _ in model.named_parameters() if n.startswith(path + "."))


def _assert_partition(model: nn.Module, lmap: LayerMap) -> None:
    """Every parameter of ``model`` is in exactly one layer or in ``others``."""
    all_names = [n for n, _ in model.named_parameters()]
    listed = [n for names in lmap.params for n in names] + list(lmap.others)
    assert sorted(listed) == sorted(all_names)
    assert len(listed) == len(set(listed))


# --------------------------------------------------------------------------- #
# Auto-detection on real architectures
# --------------------------------------------------------------------------- #


def test_gpt2_blocks_detected() -> None:
    m = tiny_gpt2(n_layer=4)
    lmap = find_layers(m)
    assert lmap.names == tuple(f"transformer.h.{i}" for i in range(4))
    assert len(lmap) == 4
    for i in range(4):
        expected = _block_param_names(m, f"transformer.h.{i}")
        assert len(expected) > 0
        assert lmap.params[i] == expected
    assert set(lmap.others) == {"transformer.wte.weight", "transformer.wpe.weight",
                                "transformer.ln_f.weight", "transformer.ln_f.bias"}
    _assert_partition(m, lmap)


def test_bert_blocks_detected() -> None:
    m = tiny_bert_cls(n_layer=3)
    lmap = find_layers(m)
    assert lmap.names == ("bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2")
    for i, name in enumerate(lmap.names):
        assert lmap.params[i] == _block_param_names(m, name)
    others = set(lmap.others)
    assert "bert.embeddings.word_embeddings.weight" in others
    assert "classifier.weight" in others and "classifier.bias" in others
    assert "bert.pooler.dense.weight" in others
    _assert_partition(m, lmap)


def test_llama_blocks_detected() -> None:
    m = tiny_llama(n_layer=3)
    lmap = find_layers(m)
    assert lmap.names == ("model.layers.0", "model.layers.1", "model.layers.2")
    for i, name in enumerate(lmap.names):
        assert lmap.params[i] == _block_param_names(m, name)
    assert set(lmap.others) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    _assert_partition(m, lmap)


def test_largest_block_list_wins() -> None:
    class TwoLists(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
            self.big = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    m = TwoLists()
    assert find_layers(m).names == ("big.0", "big.1", "big.2")


# --------------------------------------------------------------------------- #
# Tied weights
# --------------------------------------------------------------------------- #


def test_gpt2_tied_embedding_outside_layers() -> None:
    m = tiny_gpt2(n_layer=2)
    assert m.lm_head.weight is m.transformer.wte.weight  # the tie this test is about
    lmap = find_layers(m)
    in_layers = {n for names in lmap.params for n in names}
    tied_names = [n for n, p in m.named_parameters() if p is m.lm_head.weight]
    assert tied_names == ["transformer.wte.weight"]
    assert "transformer.wte.weight" not in in_layers
    assert "transformer.wte.weight" in lmap.others
    assert lmap.layer_of("transformer.wte.weight") is None


def test_gpt2_tied_embedding_left_out_of_an_explicit_layer() -> None:
    # "transformer" owns wte, but lm_head shares it: it must not be counted as the layer's own
    m = tiny_gpt2(n_layer=2)
    lmap = find_layers(m, ["transformer"])
    assert lmap.names == ("transformer",)
    assert "transformer.wte.weight" not in lmap.params[0]
    assert "transformer.wte.weight" in lmap.others
    assert "transformer.wpe.weight" in lmap.params[0]
    assert "transformer.h.1.mlp.c_fc.weight" in lmap.params[0]
    _assert_partition(m, lmap)


def test_weight_tied_across_blocks_is_outside_every_layer() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.head = nn.Linear(4, 4)
            self.head.weight = self.blocks[0].weight

    m = Tied()
    lmap = find_layers(m)
    assert lmap.names == ("blocks.0", "blocks.1", "blocks.2")
    assert lmap.params[0] == ("blocks.0.bias",)
    assert lmap.params[1] == ("blocks.1.weight", "blocks.1.bias")
    assert "blocks.0.weight" in lmap.others
    assert lmap.layer_of("blocks.0.weight") is None
    _assert_partition(m, lmap)


# --------------------------------------------------------------------------- #
# No repeated blocks
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
        nn.Sequential(nn.ModuleList([nn.Linear(3, 3), nn.Conv1d(3, 3, 1)])),  # not one class
        nn.Sequential(nn.Linear(3, 3), nn.ModuleList([nn.ReLU(), nn.ReLU()])),  # no parameters in the list
        nn.Sequential(nn.Linear(3, 3), nn.ModuleList([nn.Linear(3, 3)])),  # a single block
    ],
    ids=["mlp", "mixed-list", "parameterless-list", "single-block"],
)
def test_no_repeated_blocks_gives_empty_map(model: nn.Module) -> None:
    lmap = find_layers(model)
    assert len(lmap) == 0
    assert lmap.names == () and lmap.params == ()
    assert lmap.others == tuple(n for n, _ in model.named_parameters())
    assert lmap.layer_of(lmap.others[0]) is None


# --------------------------------------------------------------------------- #
# Explicit layers
# --------------------------------------------------------------------------- #


def test_explicit_module_paths() -> None:
    m = tiny_gpt2(n_layer=4)
    lmap = find_layers(m, ["transformer.h.0", "transformer.h.2"])
    assert lmap.names == ("transformer.h.0", "transformer.h.2")
    assert lmap.params[0] == _block_param_names(m, "transformer.h.0")
    assert lmap.params[1] == _block_param_names(m, "transformer.h.2")
    assert set(_block_param_names(m, "transformer.h.1")) <= set(lmap.others)
    assert set(_block_param_names(m, "transformer.h.3")) <= set(lmap.others)
    _assert_partition(m, lmap)


def test_explicit_regex() -> None:
    m = tiny_gpt2(n_layer=4)
    lmap = find_layers(m, [r"transformer\.h\.[13]"])
    assert lmap.names == ("transformer.h.1", "transformer.h.3")
    assert lmap.params[1] == _block_param_names(m, "transformer.h.3")
    # a regex matches in full: "h\.1" alone matches no module path
    with pytest.raises(ValueError, match=re.escape(repr(r"h\.1"))):
        find_layers(m, [r"h\.1"])


def test_explicit_sub_modules_and_duplicates() -> None:
    m = tiny_bert_cls(n_layer=2)
    lmap = find_layers(m, [r"bert\.encoder\.layer\.\d+\.attention", "bert.encoder.layer.0.attention"])
    assert lmap.names == ("bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention")
    assert all(n.startswith("bert.encoder.layer.1.attention.") for n in lmap.params[1])
    assert "bert.encoder.layer.0.intermediate.dense.weight" in lmap.others
    _assert_partition(m, lmap)


@pytest.mark.parametrize("entry", ["transformer.h.9", r"transformer\.blocks\.\d+", "nothing"])
def test_bad_entry_raises_naming_it(entry: str) -> None:
    m = tiny_gpt2(n_layer=2)
    with pytest.raises(ValueError) as err:
        find_layers(m, ["transformer.h.0", entry])
    assert repr(entry) in str(err.value)


def test_module_without_parameters_raises_naming_it() -> None:
    m = tiny_gpt2(n_layer=2)
    with pytest.raises(ValueError, match="transformer.drop"):
        find_layers(m, ["transformer.drop"])


# --------------------------------------------------------------------------- #
# LayerMap.layer_of, split/join
# --------------------------------------------------------------------------- #


def test_layer_of_parameter_names_and_block_paths() -> None:
    m = tiny_gpt2(n_layer=3)
    lmap = find_layers(m)
    for i in range(3):
        assert lmap.layer_of(f"transformer.h.{i}") == i
        for name in _block_param_names(m, f"transformer.h.{i}"):
            assert lmap.layer_of(name) == i
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.bias", "no.such.param"):
        assert lmap.layer_of(name) is None


def test_split_and_join_round_trip() -> None:
    m = tiny_gpt2(n_layer=3)
    lmap = find_layers(m)
    tree = {k: v.detach() for k, v in m.named_parameters()}
    split = split_by_layer(lmap, tree)
    assert len(split) == 3
    for i, layer in enumerate(split):
        assert len(layer) == len(lmap.params[i])
        for name, t in zip(lmap.params[i], layer):
            assert t is tree[name]
    joined = join_layers(lmap, [0, 2], [split[0], split[2]])
    assert set(joined) == set(lmap.params[0]) | set(lmap.params[2])
    assert all(joined[k] is tree[k] for k in joined)
    with pytest.raises(KeyError):
        split_by_layer(lmap, {k: v for k, v in tree.items() if k != lmap.params[1][0]})
