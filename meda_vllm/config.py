"""KV-policy settings, shared by CLI flags, ``--additional-config`` and per-request overrides.

Every setting carries the ``kv_`` prefix because the same names are the CLI flags
(``--kv-budget``), the ``--additional-config`` keys and the per-request override keys, so
validation and error messages exist once, here. The fields below are the settings every
policy shares; each policy's own settings (``kv_meda_*``, ``kv_h2o_max_queries``, ...) are
declared on its dataclass (``policies/knobs.py``) and validated here from the registry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from meda_vllm.policies import Policy, build_policy, check_settings, policy_knobs, policy_names
from meda_vllm.policies.knobs import InvalidValue as _Invalid
from meda_vllm.policies.knobs import as_float as _as_float
from meda_vllm.policies.knobs import as_int as _as_int

#: The built-in policies (``policy_names()`` also has those registered later).
POLICY_NAMES: tuple[str, ...] = policy_names()
POOLING_MODES: tuple[str, ...] = ("max", "avg", "none")
MERGE_MODES: tuple[str, ...] = ("none", "average", "weighted")

PoolingMode = Literal["max", "avg", "none"]
MergeMode = Literal["none", "average", "weighted"]


class ConfigError(ValueError):
    """A user-supplied KV-policy setting is invalid; the message is one line naming the field."""


# What each field accepts, in the words of the one-line error message.
_ALLOWED: dict[str, str] = {
    "kv_policy": "one of the registered policies",
    "kv_budget": "a ratio in (0, 1] or an integer token count > 1",
    "kv_window": "an integer >= 1",
    "kv_pooling": "one of " + ", ".join(POOLING_MODES),
    "kv_pool_kernel": "an odd integer in [1, 63]",
    "kv_merge": "one of " + ", ".join(MERGE_MODES) + " (or unset for the policy's default)",
    "kv_min_tokens_per_layer": "an integer >= 1",
    "kv_workspace_bytes": "0 (auto) or an integer >= 1048576 (1 MiB)",
    "kv_layer_groups": "an integer >= 1 that divides the model's number of layers",
}

#: Settings of the whole server: a request cannot override them (``merged`` refuses).
SERVER_ONLY: frozenset[str] = frozenset({"kv_workspace_bytes", "kv_layer_groups"})

#: The smallest explicit ``kv_workspace_bytes`` (below it nothing useful fits).
MIN_WORKSPACE_BYTES = 1 << 20

_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "kv_window": (1, None),
    "kv_pool_kernel": (1, 63),
    "kv_min_tokens_per_layer": (1, None),
    "kv_layer_groups": (1, None),
}


class KVPolicyConfig(BaseModel):
    """Which KV-cache compression policy runs, and its knobs.

    ``kv_budget`` in (0, 1] is a ratio of prompt tokens; a value > 1 (integral) is an
    absolute token count per layer (mean over layers). See ``budget_tokens``. The
    registered policies' knobs are extra fields, read as attributes like the others
    (``cfg.kv_meda_recent_fraction``), always present (their defaults when not given).
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    kv_policy: str = "none"
    kv_budget: float | int = 0.2
    kv_window: int = 32
    kv_pooling: PoolingMode = "max"
    kv_pool_kernel: int = 7
    kv_merge: MergeMode | None = None
    kv_min_tokens_per_layer: int = 16
    # Device memory set aside at engine start for one request's compression (plan, merge,
    # compaction); 0 = auto: enough for one layer at max_model_len (meda_vllm.workspace).
    kv_workspace_bytes: int = 0
    # KV cache groups the layers are split into (contiguous, equal sizes); each group holds
    # its own physical length, the largest kept length of its layers (docs/INTEGRATION.md).
    kv_layer_groups: int = 1

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_one_line(exc)) from None

    # --- validators -------------------------------------------------------------------

    @field_validator("kv_budget", mode="before")
    @classmethod
    def _check_budget(cls, value: Any) -> float | int:
        out = _as_float(value)
        if out > 1:
            if not out.is_integer():
                raise _Invalid
            return int(out)
        if out <= 0:
            raise _Invalid
        return out

    @field_validator("kv_workspace_bytes", mode="before")
    @classmethod
    def _check_workspace(cls, value: Any) -> int:
        out = _as_int(value)
        if out != 0 and out < MIN_WORKSPACE_BYTES:
            raise _Invalid
        return out

    @field_validator(*_INT_RANGES, mode="before")
    @classmethod
    def _check_int(cls, value: Any, info: Any) -> int:
        out = _as_int(value)
        lo, hi = _INT_RANGES[info.field_name]
        if out < lo or (hi is not None and out > hi):
            raise _Invalid
        if info.field_name == "kv_pool_kernel" and out % 2 == 0:
            raise _Invalid
        return out

    @field_validator("kv_policy", mode="before")
    @classmethod
    def _check_policy(cls, value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in policy_names():
            raise _Invalid
        return value.strip().lower()

    @field_validator("kv_pooling", "kv_merge", mode="before")
    @classmethod
    def _lower_choice(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _policy_knobs(cls, data: Any) -> Any:
        """The registered policies' knobs: each validated by its rule or set to its
        default; unknown names refused; then the policies' cross-knob checks."""
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        knobs = policy_knobs()
        for key in out:
            if key not in cls.model_fields and key not in knobs:
                raise ValueError(f"unknown KV policy setting {key!r}; known: {_known()}")
        for name, knob in knobs.items():
            if name not in out:
                out[name] = knob.default
                continue
            try:
                out[name] = knob.rule.check(out[name])
            except _Invalid:
                raise ValueError(
                    f"{name} must be {knob.rule.allowed} (got {out[name]!r})"
                ) from None
        check_settings(out)
        return out

    @model_validator(mode="after")
    def _budget_not_below_the_minimum(self) -> KVPolicyConfig:
        # A token count under the per-layer minimum is nearly always a ratio written as an
        # integer (3 meant as 0.3): refused, never silently raised to the minimum.
        if isinstance(self.kv_budget, int) and self.kv_budget < self.kv_min_tokens_per_layer:
            raise ValueError(
                f"kv_budget {self.kv_budget} is a token count below kv_min_tokens_per_layer "
                f"{self.kv_min_tokens_per_layer} (a ratio is written in (0, 1], e.g. 0.3)"
            )
        return self

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> KVPolicyConfig:
        """Build from a mapping whose keys may lack the ``kv_`` prefix or use dashes.

        ``None`` values mean "not given" and are skipped (argparse leaves unset flags None).
        """
        return cls(**_normalise(data))

    def merged(self, overrides: Mapping[str, Any]) -> KVPolicyConfig:
        """Per-request overrides on top of these (server) defaults, validated the same way.

        Server-wide settings (``SERVER_ONLY``) are refused with one line."""
        fields = self.model_dump()
        given = _normalise(overrides)
        for key in sorted(SERVER_ONLY & set(given)):
            raise ConfigError(
                f"{key} is a server-wide setting (--kv-policy-config); a request cannot "
                f"override it (got {given[key]!r})"
            )
        fields.update(given)
        return type(self)(**fields)

    # --- derived values ---------------------------------------------------------------

    def budget_tokens(self, n: int) -> int:
        """Mean number of tokens kept per layer for a prompt of ``n`` tokens."""
        if n <= 0:
            return 0
        if isinstance(self.kv_budget, float):
            # Exact decimal arithmetic: 0.1 * 30 must give 3, not ceil(3.0000000000000004).
            return min(n, math.ceil(Fraction(repr(self.kv_budget)) * n))
        return min(n, self.kv_budget)

    @functools.cached_property
    def policy(self) -> Policy:
        """This request's policy, built once per settings object (``policies.build_policy``)."""
        return build_policy(self)

    @property
    def evicts(self) -> bool:
        """False for policies that never drop anything (``none``, ``full``)."""
        return self.kv_policy not in ("none", "full")


def known_settings() -> tuple[str, ...]:
    """Every setting name: the shared fields, then the registered policies' knobs."""
    return tuple(dict.fromkeys([*KVPolicyConfig.model_fields, *policy_knobs()]))


def _known() -> str:
    return ", ".join(known_settings())


def _normalise(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        if value is None:
            continue
        if not isinstance(raw_key, str):
            raise ConfigError(f"KV policy setting names must be strings (got {raw_key!r})")
        key = raw_key.strip().lstrip("-").replace("-", "_").lower()
        if not key.startswith("kv_"):
            key = "kv_" + key
        if key not in known_settings():
            raise ConfigError(f"unknown KV policy setting {raw_key!r}; known: {_known()}")
        if key in out:
            raise ConfigError(f"KV policy setting {key} given twice (as {raw_key!r})")
        out[key] = value
    return out


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = err.get("loc") or ()
    field = str(loc[0]) if loc else ""
    if field == "kv_policy":
        return f"kv_policy must be one of {', '.join(policy_names())} (got {err.get('input')!r})"
    if field in _ALLOWED:
        return f"{field} must be {_ALLOWED[field]} (got {err.get('input')!r})"
    # Model-level checks write their own one-line message.
    msg = str(err.get("msg", exc))
    return msg.removeprefix("Value error, ").splitlines()[0]
