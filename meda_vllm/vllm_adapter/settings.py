"""Resolve the compression settings of the server and of one request.

Every process (API server, EngineCore, workers) sees the same
``VllmConfig.additional_config``; the CLI flags are folded into it at startup
(``cli.py``), so this module is the one reader of server settings. Per-request
overrides arrive as ``SamplingParams.extra_args`` (``vllm_xargs`` in the OpenAI
API) under the same ``kv_*`` names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from meda_vllm.config import ConfigError, KVPolicyConfig, known_settings


def split_additional_config(additional: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``kv_*`` entries of ``--additional-config`` (other plugins' keys are left alone)."""
    if not additional:
        return {}
    ours = set(known_settings())  # the shared settings and the registered policies' knobs
    return {k: v for k, v in additional.items() if k in ours}


def server_config_from_additional(additional: Mapping[str, Any] | None) -> KVPolicyConfig:
    return KVPolicyConfig.from_mapping(split_additional_config(additional))


def server_config(vllm_config: Any) -> KVPolicyConfig:
    """The server-wide settings of a running engine (cached on the config object)."""
    cached = getattr(vllm_config, "_meda_kv_config", None)
    if cached is not None:
        return cached
    cfg = server_config_from_additional(getattr(vllm_config, "additional_config", None))
    with contextlib.suppress(AttributeError, TypeError):  # frozen/slotted configs
        object.__setattr__(vllm_config, "_meda_kv_config", cfg)
    return cfg


def request_overrides(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The kv_* keys a request asked for (``vllm_xargs`` / ``extra_args``)."""
    if not extra_args:
        return {}
    return {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith("kv_")}


def request_config(server: KVPolicyConfig, extra_args: Mapping[str, Any] | None) -> KVPolicyConfig:
    """Server settings with the request's overrides on top (validated)."""
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    return server.merged(overrides)


def validate_request_overrides(
    server: KVPolicyConfig, extra_args: Mapping[str, Any] | None
) -> None:
    """Raise ConfigError with one line if a request's kv_* overrides are not acceptable."""
    overrides = request_overrides(extra_args)
    if not overrides:
        return
    if server.kv_policy == "none":
        raise ConfigError(
            "this server runs without KV compression (--kv-policy none); "
            f"per-request {', '.join(sorted(overrides))} cannot be honoured"
        )
    server.merged(overrides)


#: Server-wide defaults changed at run time (``PUT /v1/kv/policy``), kept by the API server
#: process that took the change: folded into each new request's overrides when its sampling
#: params are built, so running requests keep theirs and the engine needs no new channel.
_RUNTIME_DEFAULTS: dict[str, Any] = {}


def runtime_defaults() -> dict[str, Any]:
    return dict(_RUNTIME_DEFAULTS)


def change_runtime_defaults(server: KVPolicyConfig, changes: Mapping[str, Any]) -> KVPolicyConfig:
    """Validate ``changes`` (``kv_*`` settings a request may override) on top of the runtime
    defaults already set, keep them, and return the settings new requests now get."""
    given = request_overrides(changes)
    if set(given) != set(changes):
        bad = sorted(set(map(str, changes)) - set(given))
        raise ConfigError(f"settings are named kv_* (got {', '.join(bad)})")
    effective = {**_RUNTIME_DEFAULTS, **given}
    validate_request_overrides(server, effective)
    _RUNTIME_DEFAULTS.clear()
    _RUNTIME_DEFAULTS.update(effective)
    return server.merged(effective)


def with_runtime_defaults(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """A new request's ``extra_args`` with the runtime defaults under its own overrides."""
    if not _RUNTIME_DEFAULTS:
        return extra_args
    return {**_RUNTIME_DEFAULTS, **(extra_args or {})}


#: The server settings as seen by this process (set when the engine config is built), and
#: the engine's max_model_len.
_SEEN: dict[str, Any] = {}


def remember_server_config(cfg: KVPolicyConfig) -> None:
    _SEEN["cfg"] = cfg


def remember_max_model_len(max_len: int) -> None:
    _SEEN["max_model_len"] = max_len


def server_config_seen() -> KVPolicyConfig | None:
    """The server settings this process resolved last (None before any EngineArgs)."""
    return _SEEN.get("cfg")


def check_request(server: KVPolicyConfig, extra_args: Mapping[str, Any] | None) -> None:
    """Everything a request's ``kv_*`` overrides must pass; ConfigError (one line)."""
    validate_request_overrides(server, extra_args)
    check_budget_fits(request_config(server, extra_args))


def refused_field(error: ConfigError) -> str:
    """The request field a refusal names (its messages start with the setting)."""
    first = str(error).split(" ", 1)[0]
    return first if first.startswith("kv_") else "vllm_xargs"


def check_budget_fits(cfg: KVPolicyConfig) -> None:
    """A token budget over max_model_len could never compress a prompt: refused (one line),
    at startup and per request."""
    max_len = _SEEN.get("max_model_len")
    if isinstance(cfg.kv_budget, int) and max_len is not None and cfg.kv_budget > max_len:
        raise ConfigError(
            f"kv_budget {cfg.kv_budget} tokens exceeds --max-model-len {max_len}: no prompt "
            "would be compressed (a ratio is written in (0, 1], e.g. 0.2)"
        )
