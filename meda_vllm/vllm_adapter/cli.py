"""``--kv-policy`` and friends on ``vllm serve`` / ``EngineArgs``, validated at startup.

The flags are folded into ``additional_config`` (which reaches every vLLM process),
so ``--kv-policy meda`` and ``--additional-config '{"kv_policy": "meda"}'`` are the
same thing. Interplay with other engine features is settled here, once, with one
log line per feature that is switched off.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from meda_vllm.config import ConfigError, KVPolicyConfig, known_settings
from meda_vllm.policies import policy_names
from meda_vllm.vllm_adapter import settings
from meda_vllm.vllm_adapter.log import logger

FLAG_DESTS = ("kv_policy", "kv_budget", "kv_window", "kv_policy_config")


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a ratio in (0, 1] or an integer token count > 1 (got {text!r})"
        ) from None
    try:
        KVPolicyConfig.from_mapping({"kv_budget": value})
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _window(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})") from None
    try:
        KVPolicyConfig.from_mapping({"kv_window": value})
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _policy(text: str) -> str:
    """A registered policy's name, checked when the flags are parsed (not a fixed
    ``choices`` list: a policy another plugin registers is accepted too)."""
    try:
        return KVPolicyConfig.from_mapping({"kv_policy": text}).kv_policy
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the meda-vllm flag group to a vLLM argument parser (idempotent)."""
    if any(getattr(a, "dest", None) == "kv_policy" for a in parser._actions):
        return
    group = parser.add_argument_group(
        title="meda-vllm KV-cache compression",
        description="Compress each request's KV cache after prefill (meda-vllm plugin).",
    )
    group.add_argument(
        "--kv-policy",
        type=_policy,
        default=None,
        help="Compression policy, one of the registered ones ("
        + ", ".join(policy_names())
        + "); 'none' (default) leaves vLLM untouched.",
    )
    group.add_argument(
        "--kv-budget",
        type=_budget,
        default=None,
        help="Kept tokens per layer: a ratio in (0, 1] of the prompt, or an integer > 1.",
    )
    group.add_argument(
        "--kv-window",
        type=_window,
        default=None,
        help="Observation window: the last N prompt queries that score the keys (default 32).",
    )
    group.add_argument(
        "--kv-policy-config",
        type=_json_object,
        default=None,
        help='JSON object with the other kv_* settings, e.g. \'{"kv_merge": "average"}\'.',
    )


def fold_cli_args(args: argparse.Namespace, additional: dict[str, Any] | None) -> dict[str, Any]:
    """Merge the parsed flags into an additional_config dict (flags win). A name in
    ``--kv-policy-config`` that is no setting is refused (ConfigError, one line): the
    shared ``--additional-config`` drops unknown names, which may be another plugin's."""
    merged = dict(additional or {})
    extra = getattr(args, "kv_policy_config", None) or {}
    known = known_settings()
    for key, value in extra.items():
        name = str(key).replace("-", "_")
        name = name if name.startswith("kv_") else f"kv_{name}"
        if name not in known:
            raise ConfigError(
                f"--kv-policy-config: unknown setting {key!r}; known: {', '.join(known)}"
            )
        merged[name] = value
    for dest in ("kv_policy", "kv_budget", "kv_window"):
        value = getattr(args, dest, None)
        if value is not None:
            merged[dest] = value
    return merged


def resolve_engine_settings(engine_args: Any) -> KVPolicyConfig:
    """Validate the kv_* settings of an EngineArgs and settle feature interplay.

    Raises ConfigError (one line) on bad values or unsupported combinations; the
    normalised settings are written back into ``engine_args.additional_config``.
    """
    additional = dict(engine_args.additional_config or {})
    cfg = settings.server_config_from_additional(additional)
    settings.remember_server_config(cfg)
    if cfg.kv_policy == "none":
        return cfg
    if getattr(engine_args, "speculative_config", None):
        raise ConfigError(
            f"--kv-policy {cfg.kv_policy} does not support speculative decoding yet; "
            "drop --speculative-config or use --kv-policy none"
        )
    if (engine_args.pipeline_parallel_size or 1) > 1:
        raise ConfigError(
            f"--kv-policy {cfg.kv_policy} does not support pipeline parallelism yet "
            "(--pipeline-parallel-size must be 1)"
        )
    if (engine_args.tensor_parallel_size or 1) > 1:
        raise ConfigError(
            f"--kv-policy {cfg.kv_policy} does not support tensor parallelism yet "
            "(ranks would have to agree on kept lengths; --tensor-parallel-size must be 1)"
        )
    if getattr(engine_args, "kv_transfer_config", None):
        raise ConfigError(f"--kv-policy {cfg.kv_policy} does not support KV connectors")
    _refuse_unsupported_features(engine_args, cfg.kv_policy)
    if engine_args.enable_prefix_caching is not False:
        logger.info(
            "meda-vllm: prefix caching disabled: compacted blocks of a compressed "
            "request must never be served as prefix-cache hits"
        )
        engine_args.enable_prefix_caching = False
    if engine_args.async_scheduling is not False:
        logger.info(
            "meda-vllm: async scheduling disabled: compression rewrites a request's "
            "block table between steps (synchronous scheduling is used)"
        )
        engine_args.async_scheduling = False
    _limit_cuda_graphs(engine_args)
    _choose_attention_backend(engine_args)
    additional.update(cfg.model_dump())
    engine_args.additional_config = additional
    if getattr(engine_args, "_meda_announced", False):
        return cfg
    engine_args._meda_announced = True  # from_cli_args and create_engine_config both run this
    logger.info(
        "meda-vllm: KV compression on: %s",
        ", ".join(f"{k}={v}" for k, v in cfg.model_dump().items() if v is not None),
    )
    return cfg


#: KV cache dtypes whose pages meda's layouts and kernels read: the model's own float
#: types (``auto`` is the model dtype). Quantized caches (fp8 variants, nvfp4, int8,
#: turboquant, ...) store bytes plus scales that compaction and scoring would misread.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def _refuse_kv_cache_dtype(policy: str, dtype: str | None, source: str = "") -> None:
    if dtype is None or str(dtype) in SUPPORTED_KV_CACHE_DTYPES:
        return
    raise ConfigError(
        f"--kv-policy {policy} does not support --kv-cache-dtype {dtype}{source} "
        f"(quantized KV pages); use --kv-cache-dtype auto, float16 or bfloat16, "
        "or --kv-policy none"
    )


def _refuse_unsupported_features(engine_args: Any, policy: str) -> None:
    """Settings known from the flags alone that compression cannot run with."""
    _refuse_kv_cache_dtype(policy, getattr(engine_args, "kv_cache_dtype", None))
    # Context parallelism shards a request's KV tokens across ranks: each rank would
    # select from a part of the prompt and hold a different kept length.
    for flag, field in (
        ("--decode-context-parallel-size", "decode_context_parallel_size"),
        ("--prefill-context-parallel-size", "prefill_context_parallel_size"),
    ):
        if (getattr(engine_args, field, None) or 1) > 1:
            raise ConfigError(
                f"--kv-policy {policy} does not support context parallelism yet ({flag} must be 1)"
            )
    # DBO splits a step into two micro-batches; the compression hooks assume one
    # forward per step (query capture, then compaction after it).
    if getattr(engine_args, "enable_dbo", False):
        raise ConfigError(
            f"--kv-policy {policy} does not support dual batch overlap; drop --enable-dbo"
        )


def check_engine_config(vllm_config: Any) -> None:
    """What is known once vLLM has read the model's config, before any weight loads:
    the resolved KV cache dtype (``auto`` may mean a checkpoint's fp8) and whether the
    model needs more than one KV cache group. Raises ConfigError (one line)."""
    # Not settings.server_config: it caches on the config object, and this one is pickled
    # to the EngineCore, where vLLM's dataclasses.replace rejects unknown attributes.
    cfg = settings.server_config_from_additional(getattr(vllm_config, "additional_config", None))
    if cfg.kv_policy == "none":
        return
    cache = getattr(vllm_config, "cache_config", None)
    if cache is not None:
        _refuse_kv_cache_dtype(cfg.kv_policy, cache.cache_dtype, " (from the checkpoint)")
    model = getattr(vllm_config, "model_config", None)
    max_len = getattr(model, "max_model_len", None)
    if isinstance(max_len, int):
        settings.remember_max_model_len(max_len)
        settings.check_budget_fits(cfg)
    if model is not None:
        reason = kv_cache_group_problem(model)
        if reason:
            hint = "--disable-sliding-window or " if "sliding-window" in reason else ""
            raise ConfigError(
                f"--kv-policy {cfg.kv_policy} supports models with one KV cache group "
                f"(full attention in every layer); this model has {reason} "
                f"(use {hint}--kv-policy none)"
            )
    if cfg.kv_layer_groups > 1:
        _check_layer_groups(cfg.kv_layer_groups, vllm_config, model)


def _check_layer_groups(groups: int, vllm_config: Any, model: Any) -> None:
    """kv_layer_groups must divide the layers."""
    text = getattr(model, "hf_text_config", None) if model is not None else None
    layers = getattr(text, "num_hidden_layers", None)
    if isinstance(layers, int) and layers % groups:
        raise ConfigError(
            f"kv_layer_groups {groups} does not divide the model's {layers} layers "
            f"(use a divisor of {layers})"
        )


#: ``layer_types`` entries that are plain full attention (one shared KV cache group).
_FULL_ATTENTION_LAYER_TYPES = frozenset({"attention", "full_attention"})


def kv_cache_group_problem(model_config: Any) -> str | None:
    """Why this model would get several KV cache groups (or none), from its config;
    None if every layer is full attention. ``scheduler.attach`` re-checks the groups
    vLLM actually builds (backstop)."""
    text = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    if getattr(model_config, "is_attention_free", False):
        return "no attention layers"
    if getattr(model_config, "is_hybrid", False):
        return "non-attention (e.g. Mamba / linear attention) layers"
    if getattr(model_config, "is_encoder_decoder", False):
        return "cross-attention layers (encoder-decoder)"
    if getattr(model_config, "use_mla", False):
        return "multi-head latent attention (MLA), not full attention"
    # vLLM sets sliding_window to None when --disable-sliding-window is given (every
    # layer then runs full attention), so this reads what vLLM will build.
    window = model_config.get_sliding_window()
    if window:
        return f"sliding-window attention layers (window {window})"
    if getattr(text, "attention_chunk_size", None):
        return "chunked local attention layers"
    others = sorted(
        {
            str(t)
            for t in getattr(text, "layer_types", None) or ()
            if t not in _FULL_ATTENTION_LAYER_TYPES and t != "sliding_attention"
        }
    )
    if others:
        return f"layer types {', '.join(others)}"
    return None


def _limit_cuda_graphs(engine_args: Any) -> None:
    """FULL CUDA graphs replay captured attention metadata; compressed requests need
    per-step physical slot mappings and seq_lens, so keep graphs PIECEWISE (attention runs
    outside the graphs). Untested on a GPU so far, hence explicit."""
    if engine_args.enforce_eager:
        return
    from vllm.config.compilation import CompilationConfig, CUDAGraphMode

    cc = engine_args.compilation_config
    if isinstance(cc, dict):
        cc = CompilationConfig(**cc)
    mode = cc.cudagraph_mode
    if mode in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE):
        return
    logger.info(
        "meda-vllm: CUDA graphs limited to PIECEWISE (was %s): compressed requests "
        "need per-step physical slot mappings and sequence lengths",
        "the default" if mode is None else mode.name,
    )
    cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    engine_args.compilation_config = cc


#: Attention backends the compression tests run under, per platform: CPU_ATTN is the
#: CPU default (tests/e2e); TRITON_ATTN is what tests/gpu_path runs under Model Runner V2
#: (on CPU tensors, through the Triton interpreter) and so what CUDA gets by default.
TESTED_BACKENDS = {"cuda": ("TRITON_ATTN",), "cpu": ("CPU_ATTN", "TRITON_ATTN")}


def platform_name() -> str:
    """``cuda``, ``cpu`` or vLLM's name for another platform (patched in tests)."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return str(getattr(current_platform, "device_name", "other"))


def _backend_name(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "name", None) or str(value)
    return None if name.lower() == "auto" else name.upper()


def _choose_attention_backend(engine_args: Any) -> None:
    """On CUDA pick TRITON_ATTN unless the user chose a backend (vLLM's own default
    would be FLASH_ATTN / FLASHINFER, which no compression test runs); a chosen backend
    no test covers runs, with one warning. CPU keeps vLLM's choice."""
    ac = getattr(engine_args, "attention_config", None)
    chosen = _backend_name(getattr(engine_args, "attention_backend", None)) or _backend_name(
        ac.get("backend") if isinstance(ac, dict) else getattr(ac, "backend", None)
    )
    platform = platform_name()
    tested = TESTED_BACKENDS.get(platform)
    if tested is None:
        return
    if chosen is None:
        if platform != "cuda":
            return  # CPU always runs CPU_ATTN unless asked otherwise
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        engine_args.attention_backend = AttentionBackendEnum.TRITON_ATTN
        logger.info(
            "meda-vllm: attention backend TRITON_ATTN (the backend KV compression is "
            "tested with on CUDA; pass --attention-backend to choose another)"
        )
        return
    if chosen not in tested and not getattr(engine_args, "_meda_backend_warned", False):
        engine_args._meda_backend_warned = True  # resolve runs twice per EngineArgs
        logger.warning(
            "meda-vllm: attention backend %s is not covered by meda-vllm's tests on %s "
            "(tested: %s); KV compression runs with it untested",
            chosen,
            platform,
            ", ".join(tested),
        )


def startup_error(message: str) -> SystemExit:
    """A clean one-line failure for `vllm serve` (no traceback)."""
    return SystemExit(f"vllm: error: {message}")
