"""KVPolicyConfig: defaults, one-line errors naming the field, key spellings, overrides."""

from __future__ import annotations

import pydantic
import pytest

from meda_vllm.config import POLICY_NAMES, ConfigError, KVPolicyConfig
from meda_vllm.policies import policy_names


def test_defaults():
    cfg = KVPolicyConfig()
    assert cfg.kv_policy == "none"
    assert cfg.kv_budget == 0.2
    assert (cfg.kv_window, cfg.kv_pooling, cfg.kv_pool_kernel) == (32, "max", 7)
    assert cfg.kv_merge is None
    assert cfg.kv_meda_recent_fraction == 0.75
    assert cfg.kv_madakv_theta == 0.95
    assert not cfg.evicts


def test_policy_names_match_registry():
    assert set(POLICY_NAMES) == set(policy_names())


BAD_VALUES = [
    ("kv_policy", "foo", "kv_policy must be one of none, full, streamingllm"),
    ("kv_budget", -3, "kv_budget must be a ratio in (0, 1] or an integer token count > 1"),
    ("kv_budget", 0, "kv_budget must be a ratio in (0, 1]"),
    ("kv_budget", 1.5, "kv_budget must be"),
    ("kv_budget", float("nan"), "kv_budget must be"),
    ("kv_budget", True, "kv_budget must be"),
    ("kv_budget", "lots", "kv_budget must be"),
    ("kv_window", 0, "kv_window must be an integer >= 1"),
    ("kv_window", 2.5, "kv_window must be an integer >= 1"),
    ("kv_window", True, "kv_window must be an integer >= 1"),
    ("kv_pooling", "median", "kv_pooling must be one of max, avg, none"),
    ("kv_pool_kernel", 8, "kv_pool_kernel must be an odd integer in [1, 63]"),
    ("kv_pool_kernel", 65, "kv_pool_kernel must be an odd integer in [1, 63]"),
    ("kv_merge", "pivotal", "kv_merge must be one of none, average, weighted"),
    ("kv_meda_recent_fraction", 1.2, "kv_meda_recent_fraction must be a number in [0, 1]"),
    ("kv_meda_renormalize", "maybe", "kv_meda_renormalize must be a boolean"),
    ("kv_meda_entropy_causal", 2, "kv_meda_entropy_causal must be a boolean"),
    ("kv_meda_visual_stride", 0, "kv_meda_visual_stride must be an integer >= 1"),
    ("kv_meda_visual_rows", -1, "kv_meda_visual_rows must be an integer >= 0 (0: no cap)"),
    ("kv_madakv_theta", 0, "kv_madakv_theta must be a number in (0, 1]"),
    ("kv_madakv_theta", 1.01, "kv_madakv_theta must be a number in (0, 1]"),
    ("kv_min_tokens_per_layer", 0, "kv_min_tokens_per_layer must be an integer >= 1"),
    ("kv_sink_tokens", -1, "kv_sink_tokens must be an integer >= 0"),
    ("kv_h2o_max_queries", 0, "kv_h2o_max_queries must be an integer >= 1"),
    ("kv_pyramid_beta", 1, "kv_pyramid_beta must be a number > 1"),
    ("kv_lookm_recent_ratio", -0.1, "kv_lookm_recent_ratio must be a number in [0, 1]"),
    ("kv_lookm_topk_ratio", 2, "kv_lookm_topk_ratio must be a number in [0, 1]"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD_VALUES)
def test_bad_value_gives_one_line_naming_field(field, value, expected):
    for build in (
        lambda: KVPolicyConfig(**{field: value}),
        lambda: KVPolicyConfig.from_mapping({field: value}),
        lambda: KVPolicyConfig().merged({field: value}),
    ):
        with pytest.raises(ConfigError) as info:
            build()
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith(expected)
        assert msg.endswith(f"(got {value!r})")


def test_exact_messages():
    with pytest.raises(ConfigError, match=r"^kv_budget must be a ratio in \(0, 1\] or an integer"):
        KVPolicyConfig.from_mapping({"budget": -3})
    with pytest.raises(ConfigError) as info:
        KVPolicyConfig.from_mapping({"kv_budget": -3})
    assert str(info.value) == (
        "kv_budget must be a ratio in (0, 1] or an integer token count > 1 (got -3)"
    )
    with pytest.raises(ConfigError) as info:
        KVPolicyConfig.from_mapping({"policy": "foo"})
    assert str(info.value) == (
        "kv_policy must be one of none, full, streamingllm, h2o, snapkv, pyramidkv, lookm, "
        "meda, madakv (got 'foo')"
    )


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_keys_rejected_in_one_line():
    for build in (
        lambda: KVPolicyConfig(kv_bugdet=0.5),
        lambda: KVPolicyConfig.from_mapping({"bugdet": 0.5}),
        lambda: KVPolicyConfig().merged({"kv-bugdet": 0.5}),
    ):
        with pytest.raises(ConfigError) as info:
            build()
        assert "bugdet" in str(info.value) and "\n" not in str(info.value)


def test_lookm_ratios_cannot_both_be_zero():
    with pytest.raises(ConfigError, match="kv_lookm_recent_ratio \\+ kv_lookm_topk_ratio"):
        KVPolicyConfig(kv_lookm_recent_ratio=0, kv_lookm_topk_ratio=0)


def test_key_spellings():
    cfg = KVPolicyConfig.from_mapping(
        {"policy": "MEDA", "--kv-budget": "64", "kv-window": 8, "meda_visual_stride": 4}
    )
    assert cfg.kv_policy == "meda"
    assert cfg.kv_budget == 64 and isinstance(cfg.kv_budget, int)
    assert cfg.kv_window == 8
    assert cfg.kv_meda_visual_stride == 4


def test_same_key_twice_rejected():
    with pytest.raises(ConfigError, match="given twice"):
        KVPolicyConfig.from_mapping({"budget": 0.5, "kv_budget": 0.4})


def test_none_values_mean_not_given():
    cfg = KVPolicyConfig.from_mapping({"kv_policy": "snapkv", "kv_budget": None})
    assert cfg.kv_budget == 0.2


def test_merged_overrides_on_top_of_defaults():
    server = KVPolicyConfig(kv_policy="snapkv", kv_budget=0.3, kv_window=16)
    req = server.merged({"budget": 0.1, "merge": "weighted"})
    assert (req.kv_policy, req.kv_budget, req.kv_window, req.kv_merge) == (
        "snapkv",
        0.1,
        16,
        "weighted",
    )
    assert server.kv_budget == 0.3  # unchanged
    assert server.merged({}) == server


def test_frozen():
    cfg = KVPolicyConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.kv_budget = 0.5


@pytest.mark.parametrize(
    ("budget", "n", "expected"),
    [
        (0.2, 100, 20),
        (0.2, 101, 21),
        (0.1, 30, 3),  # exact decimal arithmetic, not ceil(3.0000000000000004)
        (0.3, 10, 3),
        (1.0, 37, 37),
        (1, 37, 37),
        (0.01, 5, 1),
        (64, 1000, 64),
        (64, 40, 40),
        (64.0, 1000, 64),
        (0.5, 0, 0),
    ],
)
def test_budget_tokens(budget, n, expected):
    assert KVPolicyConfig(kv_budget=budget).budget_tokens(n) == expected


def test_budget_type_after_validation():
    assert isinstance(KVPolicyConfig(kv_budget=64.0).kv_budget, int)
    assert isinstance(KVPolicyConfig(kv_budget=1).kv_budget, float)
    assert KVPolicyConfig(kv_budget="0.5").kv_budget == 0.5


def test_string_and_bool_inputs_from_cli():
    cfg = KVPolicyConfig.from_mapping({"meda_renormalize": "false", "window": "16"})
    assert cfg.kv_meda_renormalize is False and cfg.kv_window == 16


@pytest.mark.parametrize("value", [1000, -1, (1 << 20) - 1, True, 2.5, "lots"])
def test_workspace_bytes_one_line_error(value):
    for build in (
        lambda: KVPolicyConfig(kv_workspace_bytes=value),
        lambda: KVPolicyConfig.from_mapping({"workspace_bytes": value}),
    ):
        with pytest.raises(ConfigError) as info:
            build()
        assert str(info.value) == (
            f"kv_workspace_bytes must be 0 (auto) or an integer >= 1048576 (1 MiB) (got {value!r})"
        )


def test_workspace_bytes_values():
    assert KVPolicyConfig().kv_workspace_bytes == 0  # auto
    assert KVPolicyConfig(kv_workspace_bytes="1048576").kv_workspace_bytes == 1 << 20
    assert KVPolicyConfig.from_mapping({"workspace-bytes": 2**30}).kv_workspace_bytes == 2**30


def test_workspace_bytes_is_server_only():
    server = KVPolicyConfig(kv_policy="meda", kv_workspace_bytes=2**30)
    with pytest.raises(ConfigError) as info:
        server.merged({"kv_workspace_bytes": 2**31})
    assert str(info.value) == (
        "kv_workspace_bytes is a server-wide setting (--kv-policy-config); a request cannot "
        "override it (got 2147483648)"
    )
    assert server.merged({"kv_budget": 0.1}).kv_workspace_bytes == 2**30


def test_a_token_budget_below_the_per_layer_minimum_is_refused_not_raised():
    """``kv_budget: 3`` is nearly always a ratio written as an integer: an error, at
    startup and per request, never a silent near-empty (or silently raised) cache."""
    with pytest.raises(ConfigError, match="kv_budget 3 is a token count below"):
        KVPolicyConfig(kv_policy="meda", kv_budget=3)
    server = KVPolicyConfig(kv_policy="meda", kv_budget=0.2)
    with pytest.raises(ConfigError, match="kv_min_tokens_per_layer 16"):
        server.merged({"kv_budget": 15})
    assert server.merged({"kv_budget": 16}).kv_budget == 16
    assert server.merged({"kv_budget": 8, "kv_min_tokens_per_layer": 4}).kv_budget == 8
