"""Tests for ``flashfn.config.FlashConfig``: spec defaults, validation at construction, immutability, round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashfn.config import FlashConfig

FAST = settings(max_examples=30, deadline=None)

# The specification's dataclass, copied from docs (flash_mode.md, "FlashConfig").
SPEC_DEFAULTS = dict(
    enable_alas=True,
    enable_sample_weighting=True,
    enable_gca=True,
    min_activity=0.3,
    honest_check_every=20,
    activity_decay=0.95,
    min_sample_weight=0.3,
    low_loss_threshold=0.5,
    coherence_threshold=0.95,
    max_virtual_steps=2,
    gca_checkpoint_every=5,
    warmup_steps=100,
    loss_spike_threshold=1.1,
    auto_disable_on_spike=True,
    verbose=True,
    log_every=50,
)

BOOL_FIELDS = ("enable_alas", "enable_sample_weighting", "enable_gca", "auto_disable_on_spike", "verbose")

# field -> (kind, values that must be accepted, values that must be rejected with ValueError); the ranges follow
# what each knob means (a probability, a decay, a count, a factor > 1, ...).
NUMERIC = {
    "min_activity": (float, [0.01, 0.3, 1.0, 1], [0.0, -0.1, 1.01, 2.0]),
    "honest_check_every": (int, [1, 20, 10**6], [0, -1]),
    "activity_decay": (float, [0.0, 0.5, 0.999], [1.0, 1.5, -0.01]),
    "min_sample_weight": (float, [0.01, 0.3, 1.0], [0.0, -0.5, 1.2]),
    "low_loss_threshold": (float, [1e-6, 0.5, 100.0], [0.0, -1.0]),
    "coherence_threshold": (float, [-1.0, 0.0, 0.95, 1.0], [-1.01, 1.01, 5.0]),
    "max_virtual_steps": (int, [0, 2, 10], [-1, -5]),
    "gca_checkpoint_every": (int, [1, 5], [0, -3]),
    "warmup_steps": (int, [0, 100], [-1]),
    "loss_spike_threshold": (float, [1.01, 1.1, 3.0], [1.0, 0.9, 0.0, -1.0]),
    "log_every": (int, [1, 50], [0, -1]),
    "seed": (int, [0, 1, 2**63 - 1], [-1, 2**64]),
    "min_fidelity": (float, [0.0, 0.5, 0.99], [1.0, -0.1, 1.5]),
    "step_back_after": (int, [0, 10], [-1]),
    "prune_ratio": (float, [0.0, 0.5, 0.9], [1.0, -0.1]),
    "interp_decay": (float, [0.0, 0.9], [1.0, -0.1, 1.5]),
    "trend_weight": (float, [0.0, 0.2, 1.0], [-0.1, 1.5]),
    "noise_scale": (float, [0.0, 0.05], [-0.01]),
    "max_consecutive_skips": (int, [1, 5], [0, -1]),
    "gca_smoothing": (float, [0.0, 0.8], [1.0, -0.2, 2.0]),
    "spike_cooldown_steps": (int, [0, 100], [-1]),
}
CHOICES = {"alas_mechanism": ("branch", "freeze"), "predictor": ("momentum", "ema", "none"),
           "history_dtype": ("float32", "bfloat16")}
INT_FIELDS = [f for f, (k, _, _) in NUMERIC.items() if k is int]
FLOAT_FIELDS = [f for f, (k, _, _) in NUMERIC.items() if k is float]


def test_every_field_is_covered_by_these_tests() -> None:
    names = {f.name for f in dataclasses.fields(FlashConfig)}
    assert names == set(BOOL_FIELDS) | set(NUMERIC) | set(CHOICES) | {"layers"}
    assert set(SPEC_DEFAULTS) <= names


def test_spec_defaults() -> None:
    cfg = FlashConfig()
    for name, value in SPEC_DEFAULTS.items():
        got = getattr(cfg, name)
        assert got == value and type(got) is type(value), name


def test_extras_defaults_are_valid_and_documented_choices() -> None:
    cfg = FlashConfig()
    assert cfg.alas_mechanism in CHOICES["alas_mechanism"] and cfg.predictor in CHOICES["predictor"]
    assert cfg.layers is None


# --------------------------------------------------------------------------- #
# Accepted values
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name,value", [(n, v) for n, (_, ok, _) in NUMERIC.items() for v in ok]
                         + [(n, v) for n, vs in CHOICES.items() for v in vs]
                         + [(n, v) for n in BOOL_FIELDS for v in (True, False)])
def test_valid_values_are_accepted(name, value) -> None:
    cfg = FlashConfig(**{name: value})
    assert getattr(cfg, name) == value


def test_layers_accepts_a_sequence_of_names_and_stores_a_tuple() -> None:
    cfg = FlashConfig(layers=["model.layers.0", "model.layers.1"])
    assert cfg.layers == ("model.layers.0", "model.layers.1")


# --------------------------------------------------------------------------- #
# Rejected values: the field is named in the message
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name,value", [(n, v) for n, (_, _, bad) in NUMERIC.items() for v in bad])
def test_out_of_range_values_raise_value_error_naming_the_field(name, value) -> None:
    with pytest.raises(ValueError, match=name):
        FlashConfig(**{name: value})


def _wrong_types(kind):
    common = st.one_of(st.none(), st.text(max_size=3), st.just([1]), st.just({"a": 1}), st.just(1j))
    if kind is bool:
        return st.one_of(common, st.integers(0, 1), st.floats(0.0, 1.0), st.just("True"))
    if kind is int:
        return st.one_of(common, st.booleans(), st.floats(0.0, 10.0), st.just("3"))
    return st.one_of(common, st.booleans(), st.just("0.5"))


@FAST
@given(st.data())
def test_wrong_types_raise_type_error_naming_the_field(data) -> None:
    name = data.draw(st.sampled_from(BOOL_FIELDS + tuple(NUMERIC)))
    kind = bool if name in BOOL_FIELDS else NUMERIC[name][0]
    value = data.draw(_wrong_types(kind))
    with pytest.raises(TypeError, match=name):
        FlashConfig(**{name: value})


@FAST
@given(st.sampled_from(INT_FIELDS + FLOAT_FIELDS), st.booleans())
def test_bools_are_not_numbers(name: str, value: bool) -> None:
    with pytest.raises(TypeError, match=name):
        FlashConfig(**{name: value})


@FAST
@given(st.sampled_from(FLOAT_FIELDS), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_and_inf_are_rejected(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        FlashConfig(**{name: value})


@FAST
@given(st.data())
def test_out_of_range_floats_are_rejected(data) -> None:
    """Random values outside each float field's meaning (a probability above 1, a negative decay, ...)."""
    ranges = {"min_activity": (0.0, 1.0), "activity_decay": (0.0, 1.0), "min_sample_weight": (0.0, 1.0),
              "coherence_threshold": (-1.0, 1.0), "interp_decay": (0.0, 1.0), "trend_weight": (0.0, 1.0),
              "gca_smoothing": (0.0, 1.0), "noise_scale": (0.0, 1.0), "min_fidelity": (0.0, 1.0),
              "low_loss_threshold": (0.0, None), "prune_ratio": (0.0, 1.0),
              "loss_spike_threshold": (1.0, None)}
    name = data.draw(st.sampled_from(sorted(ranges)))
    lo, hi = ranges[name]
    below = st.floats(max_value=lo, exclude_max=True, allow_nan=False, allow_infinity=False)
    strategies = [below.filter(lambda v: v < lo - 1e-9)]
    if hi is not None:
        strategies.append(st.floats(min_value=hi, exclude_min=True, allow_nan=False, allow_infinity=False)
                          .filter(lambda v: v > hi + 1e-9))
    value = data.draw(st.one_of(strategies))
    with pytest.raises(ValueError, match=name):
        FlashConfig(**{name: value})


@FAST
@given(st.sampled_from(INT_FIELDS), st.integers(max_value=-1))
def test_negative_counts_are_rejected(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=name):
        FlashConfig(**{name: value})


@pytest.mark.parametrize("name", sorted(CHOICES))
@pytest.mark.parametrize("value", ["", "EMA", "fast", "Branch"])
def test_unknown_choices_raise_value_error(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        FlashConfig(**{name: value})


@pytest.mark.parametrize("name", sorted(CHOICES))
@pytest.mark.parametrize("value", [5, None, b"ema"])
def test_choices_of_a_wrong_type_raise_type_error(name: str, value) -> None:
    with pytest.raises(TypeError, match=name):
        FlashConfig(**{name: value})


@pytest.mark.parametrize("value", [5, "model.layers", ["ok", 3], (None,), b"ab", 1.5])
def test_layers_of_a_wrong_type_raise_type_error(value) -> None:
    with pytest.raises(TypeError, match="layers"):
        FlashConfig(layers=value)


def test_empty_layers_rejected() -> None:
    with pytest.raises(ValueError, match="layers"):
        FlashConfig(layers=())


# --------------------------------------------------------------------------- #
# Random whole configurations
# --------------------------------------------------------------------------- #

# field -> strategy of values it accepts (every field of FlashConfig, checked by the test below)
VALID = {
    **{name: st.booleans() for name in BOOL_FIELDS},
    "min_activity": st.floats(0.0, 1.0, exclude_min=True),
    "honest_check_every": st.integers(1, 10**6),
    "activity_decay": st.floats(0.0, 1.0, exclude_max=True),
    "min_sample_weight": st.floats(0.0, 1.0, exclude_min=True),
    "low_loss_threshold": st.floats(0.0, 1e6, exclude_min=True),
    "coherence_threshold": st.floats(-1.0, 1.0),
    "max_virtual_steps": st.integers(0, 100),
    "gca_checkpoint_every": st.integers(1, 1000),
    "warmup_steps": st.integers(0, 10**6),
    "loss_spike_threshold": st.floats(1.0, 100.0, exclude_min=True),
    "log_every": st.integers(1, 10**4),
    "seed": st.integers(0, 2**63 - 1),
    "min_fidelity": st.floats(0.0, 1.0, exclude_max=True),
    "step_back_after": st.integers(0, 10**4),
    "prune_ratio": st.floats(0.0, 1.0, exclude_max=True),
    "interp_decay": st.floats(0.0, 1.0, exclude_max=True),
    "trend_weight": st.floats(0.0, 1.0),
    "noise_scale": st.floats(0.0, 1.0),
    "max_consecutive_skips": st.integers(1, 100),
    "gca_smoothing": st.floats(0.0, 1.0, exclude_max=True),
    "spike_cooldown_steps": st.integers(0, 10**6),
    **{name: st.sampled_from(choices) for name, choices in CHOICES.items()},
    "layers": st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=4).map(tuple)),
}


def test_every_field_has_a_random_strategy() -> None:
    assert set(VALID) == {f.name for f in dataclasses.fields(FlashConfig)}


def _bad_value(name: str):
    """A strategy of ``(value, exception)`` for ``name``: out of range (ValueError) or of a wrong type (TypeError)."""
    def typed(values, exc):
        return values.map(lambda v: (v, exc))

    if name in BOOL_FIELDS:
        return typed(_wrong_types(bool), TypeError)
    if name in NUMERIC:
        kind, _, bad = NUMERIC[name]
        return st.one_of(typed(st.sampled_from(bad), ValueError), typed(_wrong_types(kind), TypeError))
    if name in CHOICES:
        return st.one_of(typed(st.sampled_from(["", "float16", "EMA", "Branch"]), ValueError),
                         typed(st.sampled_from([5, None, b"x", 1.5]), TypeError))
    return st.one_of(typed(st.just(()), ValueError), typed(st.sampled_from([5, "a.0", ("a", 3)]), TypeError))


@FAST
@given(st.fixed_dictionaries(VALID))
def test_random_valid_configurations_are_accepted_and_round_trip(values) -> None:
    cfg = FlashConfig(**values)
    for name, value in values.items():
        assert getattr(cfg, name) == value, name
    assert FlashConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries(VALID), st.data())
def test_random_configurations_with_one_bad_field_are_refused_naming_it(values, data) -> None:
    """A whole random configuration, valid but for one field: the error is of the right kind and names that field."""
    name = data.draw(st.sampled_from(sorted(VALID)))
    value, exc = data.draw(_bad_value(name))
    with pytest.raises(exc, match=rf"FlashConfig\.{name}\b"):
        FlashConfig(**{**values, name: value})


# --------------------------------------------------------------------------- #
# Frozen, to_dict, replace
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(FlashConfig)])
def test_frozen(name: str) -> None:
    cfg = FlashConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, getattr(cfg, name))


@pytest.mark.parametrize("cfg", [FlashConfig(), FlashConfig(warmup_steps=3, predictor="none", seed=9,
                                                           layers=("a.0", "a.1"), verbose=False)])
def test_to_dict_round_trip(cfg: FlashConfig) -> None:
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(FlashConfig)}
    assert json.loads(json.dumps(d)) == d  # JSON-serialisable
    assert FlashConfig(**d) == cfg
    assert FlashConfig(**json.loads(json.dumps(d))) == cfg
    d["warmup_steps"] = 12345  # the dict is a copy
    assert cfg.warmup_steps != 12345 and cfg.to_dict()["warmup_steps"] == cfg.warmup_steps


def test_replace_changes_only_the_given_fields_and_validates() -> None:
    cfg = FlashConfig(seed=3)
    new = cfg.replace(min_activity=0.5, honest_check_every=7)
    assert (new.min_activity, new.honest_check_every) == (0.5, 7)
    assert cfg.min_activity == 0.3 and cfg.honest_check_every == 20  # the original is untouched
    for f in dataclasses.fields(FlashConfig):
        if f.name not in ("min_activity", "honest_check_every"):
            assert getattr(new, f.name) == getattr(cfg, f.name)
    assert new.replace(min_activity=0.3, honest_check_every=20) == cfg
    with pytest.raises(ValueError, match="min_activity"):
        cfg.replace(min_activity=0.0)
    with pytest.raises(TypeError, match="warmup_steps"):
        cfg.replace(warmup_steps=1.5)
