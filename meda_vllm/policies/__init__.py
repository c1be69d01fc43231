"""Policy registry: one table from name to class. A new policy is one file plus one entry."""

from __future__ import annotations

from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies.base import Policy, Ranking
from meda_vllm.policies.full import FullPolicy, NonePolicy
from meda_vllm.policies.h2o import H2OPolicy
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


def build_policy(cfg: KVPolicyConfig) -> Policy:
    return get_policy(cfg.kv_policy).from_config(cfg)


__all__ = [
    "Policy",
    "Ranking",
    "build_policy",
    "get_policy",
    "policy_names",
    "register_policy",
]
