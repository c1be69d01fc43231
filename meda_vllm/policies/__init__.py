"""Policy registry: one table from name to class. A new policy is one file: a ``Policy``
dataclass (its settings declared with ``knobs.knob``) passed to ``register_policy``."""

from __future__ import annotations

from typing import Any

from meda_vllm.policies.base import Policy, Ranking
from meda_vllm.policies.full import FullPolicy, NonePolicy
from meda_vllm.policies.h2o import H2OPolicy
from meda_vllm.policies.knobs import Knob, knobs_of
from meda_vllm.policies.lookm import LookMPolicy
from meda_vllm.policies.madakv import MadaKVPolicy
from meda_vllm.policies.meda import MEDAPolicy
from meda_vllm.policies.pyramidkv import PyramidKVPolicy
from meda_vllm.policies.snapkv import SnapKVPolicy
from meda_vllm.policies.streamingllm import StreamingLLMPolicy

_REGISTRY: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        NonePolicy,
        FullPolicy,
        StreamingLLMPolicy,
        H2OPolicy,
        SnapKVPolicy,
        PyramidKVPolicy,
        LookMPolicy,
        MEDAPolicy,
        MadaKVPolicy,
    )
}


def register_policy(cls: type[Policy], *, replace: bool = False) -> type[Policy]:
    """Add a policy class under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and not replace and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a policy named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_policy(name: str) -> type[Policy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"kv_policy must be one of {', '.join(_REGISTRY)} (got {name!r})"
        ) from None


def policy_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def policy_knobs() -> dict[str, Knob]:
    """Every registered policy's knobs by setting name (a setting two policies share,
    such as an inherited knob, must agree on its default and rule)."""
    out: dict[str, Knob] = {}
    for cls in _REGISTRY.values():
        for k in knobs_of(cls):
            prev = out.setdefault(k.setting, k)
            if (prev.default, prev.rule.allowed) != (k.default, k.rule.allowed):
                raise ValueError(f"{k.setting} is declared twice with different defaults")
    return out


def settings_table() -> str:
    """docs/SETTINGS.md: every registered policy's knobs (``python -m meda_vllm.policies``)."""
    lines = [
        "# Policy settings",
        "",
        "<!-- Rendered from the policies' knobs by `python -m meda_vllm.policies`; a test",
        "checks it. Edit the knob in the policy's file. -->",
        "",
        "Each policy's own settings, declared on its dataclass (`meda_vllm/policies/`). Give",
        "them in `--kv-policy-config` (server default) or a request's `vllm_xargs`; the shared",
        "settings (`--kv-budget`, `--kv-window`, `kv_pooling`, `kv_pool_kernel`, `kv_merge`,",
        "`kv_min_tokens_per_layer`, `kv_workspace_bytes`) are in the README.",
        "",
        "| setting | policy | default | accepts | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, cls in _REGISTRY.items():
        for k in knobs_of(cls):
            lines.append(
                f"| `{k.setting}` | `{name}` | `{k.default}` | {k.rule.allowed} | {k.help} |"
            )
    return "\n".join(lines) + "\n"


def check_settings(values: dict[str, Any]) -> None:
    """Every registered policy's cross-knob checks (ValueError, one line)."""
    for cls in _REGISTRY.values():
        cls.check_settings(values)


def build_policy(cfg: Any) -> Policy:
    """The request's policy from its ``KVPolicyConfig``."""
    return get_policy(cfg.kv_policy).from_config(cfg)


__all__ = [
    "Policy",
    "Ranking",
    "build_policy",
    "check_settings",
    "get_policy",
    "policy_knobs",
    "policy_names",
    "register_policy",
    "settings_table",
]
