"""Sampling settings: defaults, every bound, and the messages users see for bad values."""

import dataclasses
import math

import pytest

from starcoder2.errors import ChatError, InvalidSetting
from starcoder2.settings import FIELDS, SEED_MAX, FieldSpec, SamplingSettings, validate_settings

SPECS = {spec.name: spec for spec in FIELDS}

RANGES = {
    "temperature": (0.0, 2.0),
    "top_p": (0.01, 1.0),
    "top_k": (0, 200),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1.0, 2.0),
    "max_new_tokens": (1, 8192),
}


def test_defaults_are_the_model_cards_greedy_512_token_setting():
    assert SamplingSettings() == SamplingSettings(
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_new_tokens=512,
        seed=None,
    )
    assert SamplingSettings().greedy


def test_fields_hold_every_slider_in_ui_order_with_its_range():
    assert [spec.name for spec in FIELDS] == list(RANGES)
    assert {spec.name: (spec.minimum, spec.maximum) for spec in FIELDS} == RANGES


def test_dataclass_defaults_come_from_fields():
    defaults = SamplingSettings()
    for spec in FIELDS:
        assert getattr(defaults, spec.name) == spec.default
        assert spec.minimum <= spec.default <= spec.maximum


def test_int_fields_have_whole_steps_and_bounds():
    for spec in FIELDS:
        if spec.kind is int:
            assert (spec.minimum, spec.maximum, spec.step, spec.default) == tuple(
                int(x) for x in (spec.minimum, spec.maximum, spec.step, spec.default)
            )


def test_every_field_has_a_label_and_one_line_of_help():
    for spec in FIELDS:
        assert isinstance(spec, FieldSpec)
        assert spec.label and spec.info and "\n" not in spec.info
        assert spec.kind in (int, float)
        assert 0 < spec.step <= spec.maximum - spec.minimum


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingSettings().temperature = 1.0


BOUNDS = [(name, side) for name in RANGES for side in ("minimum", "maximum")]


@pytest.mark.parametrize(("name", "side"), BOUNDS)
def test_each_bound_itself_is_accepted(name, side):
    spec = SPECS[name]
    value = getattr(spec, side)
    assert getattr(SamplingSettings(**{name: value}), name) == value


@pytest.mark.parametrize(("name", "side"), BOUNDS)
def test_just_inside_each_bound_is_accepted(name, side):
    spec = SPECS[name]
    step = 1 if spec.kind is int else 1e-9
    value = spec.minimum + step if side == "minimum" else spec.maximum - step
    assert getattr(SamplingSettings(**{name: value}), name) == value


@pytest.mark.parametrize(("name", "side"), BOUNDS)
def test_just_outside_each_bound_is_rejected_naming_field_value_and_range(name, side):
    spec = SPECS[name]
    step = 1 if spec.kind is int else 1e-9
    value = spec.minimum - step if side == "minimum" else spec.maximum + step
    with pytest.raises(InvalidSetting) as caught:
        SamplingSettings(**{name: value})
    message = str(caught.value)
    assert message.startswith(f"{name} must be ")
    assert f"between {spec.minimum:g} and {spec.maximum:g}" in message
    assert f"(got {value})" in message


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_rejected(name, value):
    with pytest.raises(InvalidSetting, match=rf"^{name} must be between .* \(got -?(nan|inf)\)$"):
        SamplingSettings(**{name: value})


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("value", ["0.5", "", None, True, False, [1], 1j])
def test_wrong_types_are_rejected(name, value):
    with pytest.raises(InvalidSetting, match=rf"^{name} must be a (whole )?number between"):
        SamplingSettings(**{name: value})


@pytest.mark.parametrize("name", ["top_k", "max_new_tokens"])
def test_int_fields_accept_whole_floats_and_store_ints(name):
    value = getattr(SamplingSettings(**{name: 100.0}), name)
    assert value == 100
    assert type(value) is int


@pytest.mark.parametrize("name", ["top_k", "max_new_tokens"])
def test_int_fields_reject_fractions(name):
    with pytest.raises(InvalidSetting, match=rf"^{name} must be a whole number .*\(got 100.5\)$"):
        SamplingSettings(**{name: 100.5})


def test_float_fields_accept_ints_and_store_floats():
    settings = SamplingSettings(temperature=1, top_p=1, repetition_penalty=2)
    assert (settings.temperature, settings.top_p, settings.repetition_penalty) == (1.0, 1.0, 2.0)
    assert type(settings.temperature) is float


def test_message_reads_naturally_for_top_p():
    with pytest.raises(InvalidSetting) as caught:
        SamplingSettings(top_p=1.5)
    assert str(caught.value) == "top_p must be between 0.01 and 1 (got 1.5)"
    assert isinstance(caught.value, ChatError)
    assert isinstance(caught.value, ValueError)


def test_top_p_of_zero_is_rejected():
    with pytest.raises(InvalidSetting, match=r"top_p must be between 0.01 and 1 \(got 0\)"):
        SamplingSettings(top_p=0)


@pytest.mark.parametrize("seed", [None, 0, 1, 12345, SEED_MAX, 7.0])
def test_valid_seeds_are_accepted(seed):
    assert SamplingSettings(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 1.5, math.nan, math.inf, "42", True])
def test_invalid_seeds_are_rejected(seed):
    with pytest.raises(InvalidSetting, match=r"^seed must be "):
        SamplingSettings(seed=seed)


def test_validate_settings_builds_from_raw_ui_values():
    settings = validate_settings(
        {"temperature": 0.7, "top_p": 0.95, "top_k": 40.0, "max_new_tokens": 1024.0, "seed": 3.0}
    )
    assert settings == SamplingSettings(
        temperature=0.7, top_p=0.95, top_k=40, max_new_tokens=1024, seed=3
    )
    assert type(settings.max_new_tokens) is int


def test_validate_settings_fills_missing_values_with_defaults():
    assert validate_settings({}) == SamplingSettings()
    assert validate_settings({"temperature": 0.2}).max_new_tokens == 512


def test_validate_settings_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(InvalidSetting, match=r"Unknown setting temprature; valid settings are"):
        validate_settings({"temprature": 0.5})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_new_tokens": 512.5}, "max_new_tokens must be a whole number between 1 and 8192"),
        ({"top_k": "40"}, "top_k must be a whole number between 0 and 200 (got '40')"),
        ({"temperature": True}, "temperature must be a number between 0 and 2 (got True)"),
        ({"min_p": math.nan}, "min_p must be between 0 and 1 (got nan)"),
        ({"repetition_penalty": 0.9}, "repetition_penalty must be between 1 and 2 (got 0.9)"),
    ],
)
def test_validate_settings_rejects_bad_raw_values(values, message):
    with pytest.raises(InvalidSetting) as caught:
        validate_settings(values)
    assert str(caught.value).startswith(message)
