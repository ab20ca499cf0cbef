"""Sampling settings: one frozen dataclass, with every field's range and default in FIELDS."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields

from starcoder2.errors import InvalidSetting

SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class FieldSpec:
    """One slider: its range, step and default, and a one-line explanation for the UI."""

    name: str
    label: str
    minimum: float
    maximum: float
    step: float
    default: float
    kind: type
    info: str


# Defaults follow the model card, which evaluates greedily with 512 new tokens: greedy decoding
# (temperature 0) makes top_p/top_k/min_p irrelevant, so they sit at their neutral values.
# top_p starts at 0.01 rather than 0: a nucleus of zero probability mass is meaningless.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "temperature", "Temperature", 0.0, 2.0, 0.05, 0.0, float,
        "0 is greedy (the model card's setting); higher values give more varied answers.",
    ),
    FieldSpec(
        "top_p", "Top-p", 0.01, 1.0, 0.01, 1.0, float,
        "Sample only from the most likely tokens whose probabilities add up to this; 1 is off.",
    ),
    FieldSpec(
        "top_k", "Top-k", 0, 200, 1, 0, int,
        "Sample only from this many most likely tokens; 0 is off.",
    ),
    FieldSpec(
        "min_p", "Min-p", 0.0, 1.0, 0.01, 0.0, float,
        "Drop tokens less likely than this fraction of the most likely one; 0 is off.",
    ),
    FieldSpec(
        "repetition_penalty", "Repetition penalty", 1.0, 2.0, 0.01, 1.0, float,
        "Above 1 discourages repeating earlier tokens; 1 is off.",
    ),
    FieldSpec(
        "max_new_tokens", "Max new tokens", 1, 8192, 1, 512, int,
        "The longest answer, in tokens; the model card uses 512.",
    ),
)  # fmt: skip

_SPECS = {spec.name: spec for spec in FIELDS}


def _show(value: object) -> str:
    """Format a number for a message: 1.0 -> '1', 0.05 -> '0.05', strings quoted."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return repr(value)


def _number(name: str, value: object, kind: type, minimum: float, maximum: float) -> float | int:
    """Return value as `kind` if it is a finite number within [minimum, maximum], else raise."""
    bounds = f"between {_show(minimum)} and {_show(maximum)}"
    whole = "a whole number " if kind is int else "a number "
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidSetting(f"{name} must be {whole}{bounds} (got {_show(value)})")
    if isinstance(value, numbers.Integral):
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InvalidSetting(f"{name} must be {bounds} (got {_show(value)})")
        if kind is int:
            if not value.is_integer():
                raise InvalidSetting(f"{name} must be {whole}{bounds} (got {_show(value)})")
            value = int(value)
    if not minimum <= value <= maximum:
        raise InvalidSetting(f"{name} must be {bounds} (got {_show(value)})")
    return kind(value)


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample one answer; construction validates and normalises every field."""

    temperature: float = _SPECS["temperature"].default  # 0 = greedy
    top_p: float = _SPECS["top_p"].default
    top_k: int = int(_SPECS["top_k"].default)  # 0 = off
    min_p: float = _SPECS["min_p"].default
    repetition_penalty: float = _SPECS["repetition_penalty"].default
    max_new_tokens: int = int(_SPECS["max_new_tokens"].default)
    seed: int | None = None  # None = random

    def __post_init__(self) -> None:
        for spec in FIELDS:
            value = _number(
                spec.name, getattr(self, spec.name), spec.kind, spec.minimum, spec.maximum
            )
            object.__setattr__(self, spec.name, value)
        if self.seed is not None:
            object.__setattr__(self, "seed", _number("seed", self.seed, int, 0, SEED_MAX))

    @property
    def greedy(self) -> bool:
        """True when decoding always takes the most likely token."""
        return self.temperature == 0.0


def validate_settings(values: Mapping[str, object]) -> SamplingSettings:
    """Build SamplingSettings from raw UI/API values; missing keys take their defaults."""
    known = {field.name for field in fields(SamplingSettings)}
    unknown = sorted(str(key) for key in values if key not in known)
    if unknown:
        raise InvalidSetting(
            f"Unknown setting {', '.join(unknown)}; valid settings are {', '.join(sorted(known))}."
        )
    return SamplingSettings(**values)  # type: ignore[arg-type]
