"""Startup validation of the kv_* settings on a real vLLM EngineArgs (no engine started)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from meda_vllm.config import ConfigError  # noqa: E402
from meda_vllm.vllm_adapter import cli, runner  # noqa: E402
from meda_vllm.vllm_adapter.layouts import UnsupportedLayoutError  # noqa: E402
from meda_vllm.vllm_adapter.patches import engine_args, initialize_kv_cache  # noqa: E402


def _args(**kw) -> EngineArgs:
    return EngineArgs(model="unused", **kw)


def test_policy_none_changes_nothing():
    ea = _args(additional_config={"other_plugin": 1})
    cfg = cli.resolve_engine_settings(ea)
    assert cfg.kv_policy == "none"
    assert ea.additional_config == {"other_plugin": 1}
    assert ea.enable_prefix_caching is None and ea.async_scheduling is None


def test_policy_switches_off_prefix_caching_and_async_scheduling():
    ea = _args(additional_config={"kv_policy": "meda", "kv_budget": 0.3, "other": "x"})
    cfg = cli.resolve_engine_settings(ea)
    assert (cfg.kv_policy, cfg.kv_budget) == ("meda", 0.3)
    assert ea.enable_prefix_caching is False
    assert ea.async_scheduling is False
    assert ea.additional_config["other"] == "x"
    assert ea.additional_config["kv_window"] == cfg.kv_window  # normalised for every process


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"tensor_parallel_size": 2}, "tensor parallelism"),
        ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative"),
    ],
)
def test_unsupported_features_are_refused_with_one_line(kw, message):
    ea = _args(additional_config={"kv_policy": "snapkv"}, **kw)
    with pytest.raises(ConfigError) as exc:
        cli.resolve_engine_settings(ea)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_flags_fold_into_additional_config_and_flags_win():
    parser = argparse.ArgumentParser()
    cli.add_cli_args(parser)
    cli.add_cli_args(parser)  # idempotent
    args = parser.parse_args(
        [
            "--kv-policy",
            "madakv",
            "--kv-budget",
            "64",
            "--kv-policy-config",
            '{"madakv_theta": 0.9}',
        ]
    )
    merged = cli.fold_cli_args(args, {"kv_policy": "snapkv", "unrelated": True})
    assert merged == {
        "kv_policy": "madakv",
        "kv_budget": 64.0,
        "kv_madakv_theta": 0.9,
        "unrelated": True,
    }


@pytest.mark.parametrize(
    "argv", [["--kv-policy", "nope"], ["--kv-budget", "1.5"], ["--kv-window", "0"]]
)
def test_bad_flags_are_argparse_errors(argv, capsys):
    parser = argparse.ArgumentParser()
    cli.add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


# ---- refused before the model loads (issue 13, item 6) -------------------------------


@pytest.mark.parametrize("dtype", ["fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "nvfp4"])
def test_quantized_kv_cache_dtype_is_refused_naming_the_flag(dtype):
    ea = _args(additional_config={"kv_policy": "meda", "kv_budget": 0.2}, kv_cache_dtype=dtype)
    with pytest.raises(ConfigError) as exc:
        cli.resolve_engine_settings(ea)
    assert f"--kv-cache-dtype {dtype}" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("dtype", ["auto", "float16", "bfloat16"])
def test_float_kv_cache_dtypes_are_accepted(dtype):
    ea = _args(additional_config={"kv_policy": "meda"}, kv_cache_dtype=dtype)
    assert cli.resolve_engine_settings(ea).kv_policy == "meda"


def test_policy_none_does_not_refuse_anything():
    ea = _args(
        additional_config={"kv_policy": "none"},
        kv_cache_dtype="fp8",
        decode_context_parallel_size=2,
        enable_dbo=True,
    )
    assert cli.resolve_engine_settings(ea).kv_policy == "none"
    assert ea.kv_cache_dtype == "fp8" and ea.additional_config == {"kv_policy": "none"}


@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"decode_context_parallel_size": 2}, "--decode-context-parallel-size"),
        ({"prefill_context_parallel_size": 2}, "--prefill-context-parallel-size"),
        ({"enable_dbo": True}, "--enable-dbo"),
    ],
)
def test_context_parallel_and_dbo_are_refused_naming_the_flag(kw, flag):
    ea = _args(additional_config={"kv_policy": "snapkv"}, **kw)
    with pytest.raises(ConfigError) as exc:
        cli.resolve_engine_settings(ea)
    assert flag in str(exc.value) and "\n" not in str(exc.value)


def _engine_config(model_config=None, cache_dtype="auto", policy="meda", v2=False, **settings):
    return SimpleNamespace(
        additional_config={"kv_policy": policy, **settings},
        cache_config=SimpleNamespace(cache_dtype=cache_dtype),
        model_config=model_config,
        use_v2_model_runner=v2,
    )


def _model_config(window=None, **text):
    return SimpleNamespace(
        hf_text_config=SimpleNamespace(**text),
        hf_config=None,
        is_attention_free=False,
        is_hybrid=text.pop("is_hybrid", False),
        is_encoder_decoder=False,
        use_mla=text.pop("use_mla", False),
        get_sliding_window=lambda: window,
    )


def test_a_checkpoint_fp8_kv_cache_is_refused_once_the_config_is_read():
    """``auto`` resolves to the checkpoint's kv_cache_quant_algo in create_engine_config."""
    with pytest.raises(ConfigError, match="--kv-cache-dtype fp8 .from the checkpoint"):
        cli.check_engine_config(_engine_config(cache_dtype="fp8"))
    cli.check_engine_config(_engine_config(cache_dtype="fp8", policy="none"))


@pytest.mark.parametrize(
    "model, words",
    [
        (_model_config(window=4096), "sliding-window"),
        (_model_config(layer_types=["full_attention", "linear_attention"]), "linear_attention"),
        (_model_config(is_hybrid=True), "Mamba"),
        (_model_config(use_mla=True), "MLA"),
        (_model_config(attention_chunk_size=8192), "chunked"),
    ],
)
def test_models_with_several_kv_cache_groups_are_refused_from_their_config(model, words):
    with pytest.raises(ConfigError) as exc:
        cli.check_engine_config(_engine_config(model))
    assert "one KV cache group" in str(exc.value) and words in str(exc.value)
    assert "\n" not in str(exc.value)
    cli.check_engine_config(_engine_config(model, policy="none"))


def test_layer_groups_that_do_not_divide_the_layers_are_refused():
    """kv_layer_groups > 1 must divide the layers (once the config is read, before weights
    load; one line); both model runners take it."""
    model = _model_config(num_hidden_layers=4)
    cli.check_engine_config(_engine_config(model, kv_layer_groups=2))
    cli.check_engine_config(_engine_config(model, v2=True, kv_layer_groups=4))
    with pytest.raises(ConfigError, match="does not divide the model's 4 layers") as exc:
        cli.check_engine_config(_engine_config(model, kv_layer_groups=3))
    assert "\n" not in str(exc.value)


def test_full_attention_and_disabled_sliding_window_pass():
    full = _model_config(layer_types=["full_attention", "full_attention"])
    cli.check_engine_config(_engine_config(full))
    # --disable-sliding-window: vLLM clears sliding_window, every layer is full attention
    disabled = _model_config(layer_types=["sliding_attention", "full_attention"])
    cli.check_engine_config(_engine_config(disabled))


def test_a_real_sliding_window_config_is_refused_before_weights_load(tiny_model_dir, tmp_path):
    """The tiny Qwen2-VL with sliding-window layers: create_engine_config reads only its
    config (no weights are touched) and the patched wrapper refuses it."""
    engine_args.apply()
    sw = tmp_path / "tiny-sw"
    shutil.copytree(tiny_model_dir, sw)
    (sw / "model.safetensors").write_bytes(b"not weights")  # never read
    config = json.loads((sw / "config.json").read_text())
    text = config["text_config"]
    text.update(use_sliding_window=True, sliding_window=4096, max_window_layers=0)
    text["layer_types"] = ["sliding_attention"] * text["num_hidden_layers"]
    (sw / "config.json").write_text(json.dumps(config))
    kw = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048}
    ea = EngineArgs(model=str(sw), additional_config={"kv_policy": "meda"}, **kw)
    with pytest.raises(ConfigError, match="sliding-window attention layers .window 4096"):
        ea.create_engine_config()
    ea = EngineArgs(
        model=str(sw), additional_config={"kv_policy": "meda"}, disable_sliding_window=True, **kw
    )
    vllm_config = ea.create_engine_config()
    # The checked config still goes through vLLM's dataclasses.replace (the EngineCore
    # and worker do that while building the model): nothing foreign may be cached on it.
    vllm_config.with_hf_config(vllm_config.model_config.hf_config)


# ---- the kernel block size (checked by the worker once the backends are known) -------


def _runner(manager_block_size: int, policy: str = "meda"):
    group = SimpleNamespace(kv_cache_spec=SimpleNamespace(block_size=manager_block_size))
    return SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config={"kv_policy": policy}),
        kv_cache_config=SimpleNamespace(kv_cache_groups=[group]),
    )


def test_kernel_block_splitting_is_refused_by_the_worker():
    with pytest.raises(UnsupportedLayoutError) as exc:
        runner.check_kernel_block_sizes(_runner(256), [64])
    assert "--block-size 256 into kernel blocks of 64" in str(exc.value)
    assert "\n" not in str(exc.value)
    runner.check_kernel_block_sizes(_runner(32), [32])
    runner.check_kernel_block_sizes(_runner(256, policy="none"), [64])


def test_both_runners_check_the_kernel_block_sizes_they_choose():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1

    initialize_kv_cache.apply_v1()
    initialize_kv_cache.apply_v2()
    for cls in (V1, V2):
        assert "wrap_initialize_kv_cache" in cls.initialize_kv_cache.__qualname__

    class Runner:  # stands for a runner whose initialize_kv_cache picked kernel blocks
        def initialize_kv_cache(self, kv_cache_config):
            self.kernel_block_sizes = [32]

    initialize_kv_cache.wrap_initialize_kv_cache(Runner, "kernel_block_sizes")
    fake = Runner()
    fake.__dict__.update(vars(_runner(128)))
    with pytest.raises(UnsupportedLayoutError):
        fake.initialize_kv_cache(fake.kv_cache_config)


# ---- the attention backend (issue 13, item 7) ---------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def meda_log():
    """Our log records, whatever vLLM's logging setup does with propagation."""
    log = logging.getLogger("vllm.meda_vllm")
    handler, level = _Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def _meda_lines(handler, level):
    return [r.getMessage() for r in handler.records if r.levelno == level]


def test_cuda_without_a_chosen_backend_gets_triton_attn(monkeypatch, meda_log):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    monkeypatch.setattr(cli, "platform_name", lambda: "cuda")
    ea = _args(additional_config={"kv_policy": "meda"})
    cli.resolve_engine_settings(ea)
    cli.resolve_engine_settings(ea)  # from_cli_args and create_engine_config both run it
    assert ea.attention_backend == AttentionBackendEnum.TRITON_ATTN
    picked = [m for m in _meda_lines(meda_log, logging.INFO) if "TRITON_ATTN" in m]
    assert len(picked) == 1
    assert not _meda_lines(meda_log, logging.WARNING)


@pytest.mark.parametrize("how", ["attention_backend", "attention_config"])
def test_cuda_keeps_a_user_chosen_backend_with_one_warning(monkeypatch, meda_log, how):
    monkeypatch.setattr(cli, "platform_name", lambda: "cuda")
    kw = (
        {"attention_backend": "FLASH_ATTN"}
        if how == "attention_backend"
        else {"attention_config": {"backend": "FLASHINFER"}}
    )
    ea = _args(additional_config={"kv_policy": "meda"}, **kw)
    cli.resolve_engine_settings(ea)
    cli.resolve_engine_settings(ea)
    chosen = "FLASH_ATTN" if how == "attention_backend" else "FLASHINFER"
    if how == "attention_backend":
        assert ea.attention_backend == "FLASH_ATTN"
    else:
        assert ea.attention_backend is None
    warnings = _meda_lines(meda_log, logging.WARNING)
    assert len(warnings) == 1 and chosen in warnings[0] and "\n" not in warnings[0]


def test_cuda_triton_attn_chosen_by_the_user_is_quiet(monkeypatch, meda_log):
    monkeypatch.setattr(cli, "platform_name", lambda: "cuda")
    ea = _args(additional_config={"kv_policy": "meda"}, attention_backend="TRITON_ATTN")
    cli.resolve_engine_settings(ea)
    assert ea.attention_backend == "TRITON_ATTN"
    assert not _meda_lines(meda_log, logging.WARNING)


def test_cuda_with_policy_none_leaves_the_backend_alone(monkeypatch, meda_log):
    monkeypatch.setattr(cli, "platform_name", lambda: "cuda")
    ea = _args(additional_config={"kv_policy": "none"}, attention_backend="FLASH_ATTN")
    cli.resolve_engine_settings(ea)
    assert ea.attention_backend == "FLASH_ATTN"
    ea = _args(additional_config={"kv_policy": "none"})
    cli.resolve_engine_settings(ea)
    assert ea.attention_backend is None
    assert not _meda_lines(meda_log, logging.WARNING)


def test_cpu_changes_nothing(monkeypatch, meda_log):
    monkeypatch.setattr(cli, "platform_name", lambda: "cpu")
    ea = _args(additional_config={"kv_policy": "meda"})
    cli.resolve_engine_settings(ea)
    assert ea.attention_backend is None
    for tested in ("CPU_ATTN", "TRITON_ATTN"):  # tests/e2e, tests/gpu_path
        ea = _args(additional_config={"kv_policy": "meda"}, attention_backend=tested)
        cli.resolve_engine_settings(ea)
        assert ea.attention_backend == tested
    assert not _meda_lines(meda_log, logging.WARNING)
    ea = _args(additional_config={"kv_policy": "meda"}, attention_backend="FLEX_ATTENTION")
    cli.resolve_engine_settings(ea)
    assert len(_meda_lines(meda_log, logging.WARNING)) == 1
