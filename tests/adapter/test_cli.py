"""Startup validation of the kv_* settings on a real vLLM EngineArgs (no engine started)."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("vllm")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from meda_vllm.config import ConfigError  # noqa: E402
from meda_vllm.vllm_adapter import cli  # noqa: E402


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
