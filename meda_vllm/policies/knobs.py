"""A policy's own settings: declared on its dataclass with ``knob(...)``, read from there by
``KVPolicyConfig`` (validation, defaults, the one-line errors), the CLI and the docs.

    @dataclass(frozen=True)
    class MyPolicy(Policy):
        name = "mine"
        strength: float = knob(0.5, number(0, 1), "how hard to push", setting="kv_mine_strength")

The setting name defaults to ``kv_<policy name>_<field>``, named after the policy that
declares the knob (a subclass inherits the setting along with the field).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], Any]


class InvalidValue(ValueError):
    """A value outside its knob's range (turned into a one-line ``ConfigError``)."""


@dataclass(frozen=True)
class Rule:
    """How a knob's value is parsed and checked, and the words for what it accepts."""

    allowed: str  # "a number in [0, 1]": completes "<setting> must be ..."
    check: Check


@dataclass(frozen=True)
class Knob:
    setting: str  # the kv_* name: CLI --kv-policy-config key, request override, docs
    field: str  # the policy dataclass field it fills
    default: Any
    rule: Rule
    help: str


def as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidValue
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise InvalidValue from None
    raise InvalidValue


def as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidValue
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            raise InvalidValue from None
    else:
        raise InvalidValue
    if not math.isfinite(out):
        raise InvalidValue
    return out


def integer(ge: int, note: str = "") -> Rule:
    def check(value: Any) -> int:
        out = as_int(value)
        if out < ge:
            raise InvalidValue
        return out

    return Rule(f"an integer >= {ge}" + (f" ({note})" if note else ""), check)


def number(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Rule:
    """``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); without ``hi``: ``> lo``."""

    def check(value: Any) -> float:
        out = as_float(value)
        above = out > lo if lo_open or hi is None else out >= lo
        if not above or (hi is not None and out > hi):
            raise InvalidValue
        return out

    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    if hi is None:
        return Rule(f"a number > {fmt(lo)}", check)
    return Rule(f"a number in {'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}]", check)


def _check_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidValue


BOOLEAN = Rule("a boolean", _check_bool)


def knob(default: Any, rule: Rule, help: str, *, setting: str | None = None) -> Any:
    """A dataclass field that is also a setting (see the module docstring)."""
    return dataclasses.field(
        default=default, metadata={"knob": {"rule": rule, "help": help, "setting": setting}}
    )


def knobs_of(cls: type) -> tuple[Knob, ...]:
    """The knobs a policy class declares (its own and inherited ones). An inherited knob
    keeps the setting of the policy that declared it: a subclass shares it, not renames it."""
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("knob")
        if meta is None:
            continue
        setting = meta["setting"] or f"kv_{_declared_by(cls, f.name).name}_{f.name}"
        out.append(Knob(setting, f.name, f.default, meta["rule"], meta["help"]))
    return tuple(out)


def _declared_by(cls: type, field: str) -> type:
    """The class nearest ``cls`` in its MRO that declares ``field`` itself."""
    return next(c for c in cls.__mro__ if field in c.__dict__.get("__annotations__", {}))
