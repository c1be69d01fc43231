"""`vllm serve --kv-policy ...` end to end on the tiny Qwen2-VL (CPU, real server)."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from tests.e2e.client import (
    MetricPeaks,
    chat,
    run_concurrently,
    skip_count,
    usage_after_prefill,
    wait_idle,
)
from tests.e2e.media import image_part, text_part, video_part
from tests.e2e.server import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MEDA = ["--kv-policy", "meda", "--kv-budget", "0.2"]
# 896x896 images are 1024 visual tokens with the tiny model's processor.
LONG_IMAGE_SIDE = 896


@pytest.fixture(scope="module")
def meda_server(server_factory):
    return server_factory("meda-0.2", MEDA)


@pytest.fixture(scope="module")
def none_server(server_factory):
    return server_factory("none", ["--kv-policy", "none"])


def long_image_request(seed: int) -> list[dict]:
    return [image_part(seed, LONG_IMAGE_SIDE), text_part("Describe this picture in detail.")]


def test_openai_client_image_images_video_text(meda_server):
    cases = {
        "one image": [image_part(0), text_part("What is in this image?")],
        "several images": [image_part(1), image_part(2, 448), text_part("Compare them.")],
        "video": [video_part(), text_part("Describe the video.")],
        "text only": [text_part("Hello, who are you?")],
        "long image": long_image_request(3),
    }
    for name, content in cases.items():
        r = chat(meda_server, content, max_tokens=8)
        assert r.choices[0].message.content, name
        assert r.usage.completion_tokens > 0, name


def long_requests(
    srv, n_requests: int, max_tokens: int, images: int = 1, seed0: int = 0, **xargs
) -> MetricPeaks:
    """Send long image requests at once; return the polled metrics."""

    def content(seed: int):
        parts = [image_part(seed * 10 + i, LONG_IMAGE_SIDE) for i in range(images)]
        return [*parts, text_part("Describe this picture in detail.")]

    fns = [
        (
            lambda s=s: chat(
                srv, content(s), max_tokens=max_tokens, ignore_eos=True, vllm_xargs=xargs or None
            )
        )
        for s in range(seed0, seed0 + n_requests)
    ]
    names = ["vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"]
    with MetricPeaks(srv, names, period=0.005) as polled:
        run_concurrently(fns)
    wait_idle(srv)
    return polled


def held_after_prefill(srv, seeds: list[int], bound: str) -> float:
    """Sum over long image requests, sent one at a time, of the KV usage each holds right
    after its prefill (see ``client.usage_after_prefill`` for the bound). 256 decode
    tokens keep a request running for over a second here: many /metrics samples."""
    return sum(
        usage_after_prefill(
            srv,
            lambda s=s: chat(srv, long_image_request(s), max_tokens=256, ignore_eos=True),
            bound,
        )
        for s in seeds
    )


HELD_SEEDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def held_uncompressed(none_server) -> float:
    """What the long image requests hold after prefill without compression (measured once
    for every policy compared with it)."""
    return held_after_prefill(none_server, HELD_SEEDS, "lower")


@pytest.mark.parametrize("policy", ["snapkv", "meda"])
def test_blocks_held_after_prefill_shrink_to_budget(server_factory, held_uncompressed, policy):
    """KV blocks held by long image requests after prefill, 0.2 budget vs no compression."""
    if policy == "snapkv":  # the same settings through --additional-config
        flags = ["--additional-config", json.dumps({"kv_policy": policy, "kv_budget": 0.2})]
    else:
        flags = ["--kv-policy", policy, "--kv-budget", "0.2"]
    srv = server_factory(f"{policy}-0.2", flags)
    base = held_uncompressed
    comp = held_after_prefill(srv, HELD_SEEDS, "upper")
    ratio = comp / base
    print(f"{policy}: KV usage after prefill none={base:.4f} {policy}={comp:.4f} ratio={ratio:.3f}")
    assert ratio <= 0.25


def _greedy_tokens(srv, content, **xargs) -> list[str]:
    r = chat(srv, content, max_tokens=16, logprobs=True, vllm_xargs=xargs or None)
    return [t.token for t in r.choices[0].logprobs.content]


def test_a_budget_of_one_leaves_the_request_alone(meda_server, none_server):
    """A budget of 1.0 (asked per request; a server flag resolves the same settings)
    keeps every prompt whole: nothing is compressed (each request is skipped as
    ``short_prompt``) and the tokens are stock vLLM's. What compressed requests decode is
    checked against the reference oracle in test_oracle.py."""
    full = meda_server
    compressed = full.metrics().get("meda:requests_compressed_total", 0)
    prompts = [
        [image_part(10), text_part("What is in this image?")],
        long_image_request(11),
        [video_part(), text_part("Describe the video.")],
        [text_part("Tell me a story about a cat.")],
    ]
    before = skip_count(full, "short_prompt")
    for content in prompts:
        whole = _greedy_tokens(full, content, kv_budget=1.0)
        assert whole == _greedy_tokens(none_server, content)
    assert skip_count(full, "short_prompt") == before + len(prompts)
    assert full.metrics().get("meda:requests_compressed_total", 0) == compressed


def test_bad_request_values_get_400_and_server_keeps_serving(meda_server):
    content = [image_part(0), text_part("What is in this image?")]
    for bad in ({"kv_budget": -1}, {"kv_budget": 0}, {"kv_policy": "bogus"}, {"kv_window": 0}):
        with pytest.raises(openai.BadRequestError) as exc:
            chat(meda_server, content, vllm_xargs=bad)
        assert next(iter(bad)) in str(exc.value)
    r = chat(meda_server, content, vllm_xargs={"kv_budget": 0.5})
    assert r.usage.completion_tokens > 0
    r = chat(meda_server, content, vllm_xargs={"kv_policy": "none"})
    assert r.usage.completion_tokens > 0


def test_fifty_mixed_requests_leave_the_pool_fully_free(meda_server):
    def content(i: int):
        kind = i % 6
        if kind == 0:
            return long_image_request(i), {}
        if kind == 1:
            return [image_part(i), text_part("What is this?")], {"vllm_xargs": {"kv_budget": 0.1}}
        if kind == 2:
            return [text_part("Hi")], {}  # very short, text only
        if kind == 3:
            return [video_part(), text_part("Describe.")], {"vllm_xargs": {"kv_policy": "snapkv"}}
        if kind == 4:
            return [image_part(i), image_part(i + 1, 448), text_part("Both?")], {}
        return [image_part(i, 448), text_part("Go.")], {"vllm_xargs": {"kv_policy": "none"}}

    def one(i: int):
        c, extra = content(i)
        return chat(meda_server, c, max_tokens=4 + i % 12, **extra)

    for start in range(0, 50, 10):
        results = run_concurrently([lambda i=i: one(i) for i in range(start, start + 10)])
        assert all(r.usage.completion_tokens > 0 for r in results)
    m = wait_idle(meda_server)
    assert m["vllm:num_requests_running"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0.0


def test_compression_multiplies_concurrent_long_requests(server_factory):
    """Same small pool: how many long image requests run at once, with compression and
    with the same requests asking for ``kv_policy: none``."""
    # Requests of two 1024-token images (~2100 tokens, 66 blocks of 32); the pool holds
    # 131 blocks (1 KiB per token for the tiny model): one request fits uncompressed.
    pool = ["--kv-cache-memory-bytes", str(131 * 32 * 1024)]
    comp_srv = server_factory("small-meda", [*MEDA, *pool])
    base = long_requests(comp_srv, 8, 32, images=2, kv_policy="none")
    base = base.peaks["vllm:num_requests_running"]
    comp = long_requests(comp_srv, 8, 32, images=2).peaks["vllm:num_requests_running"]
    print(f"peak running: none={base} meda={comp}")
    assert base >= 1
    assert comp >= 3 * base


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-policy", "foo"], "--kv-policy"),
        (["--kv-budget", "0"], "kv_budget must be"),
        (["--kv-policy", "meda", "--kv-budget", "abc"], "--kv-budget: must be"),
        (["--kv-policy", "meda", "--kv-budget", "3"], "kv_min_tokens_per_layer"),
        (["--kv-policy", "meda", "--kv-budget", "100000"], "exceeds --max-model-len"),
        (["--kv-policy", "meda", "--kv-policy-config", '{"kv_foo": 1}'], "kv_foo"),
        (["--kv-policy", "meda", "--kv-policy-config", '{"kv_window": 0}'], "kv_window"),
        (["--kv-policy", "meda", "--kv-policy-config", "{not json"], "--kv-policy-config"),
        ([*MEDA, "--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
        ([*MEDA, "--decode-context-parallel-size", "2"], "--decode-context-parallel-size"),
        ([*MEDA, "--enable-dbo"], "--enable-dbo"),
    ],
)
def test_bad_flags_fail_at_startup_with_one_line(tiny_model_dir, flags, message):
    _assert_refused_before_loading(run_cli(["serve", str(tiny_model_dir), *flags]), message)


#: Log lines of an EngineCore that started, or of a model whose weights began to load.
_LOADING_MARKERS = ("EngineCore", "Starting to load model", "Loading weights", "Model loading")


def _assert_refused_before_loading(proc, message: str) -> None:
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    # "vllm: error: ..." (ours) or "vllm serve: error: ..." (argparse)
    assert last.startswith("vllm") and ": error: " in last and message in last, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert not [m for m in _LOADING_MARKERS if m in log], log[-2000:]


@pytest.fixture(scope="module")
def sliding_window_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Qwen2-VL, its config switched to sliding-window attention in every layer
    (weights untouched: they must never be read)."""
    out = tmp_path_factory.mktemp("tiny-sliding-window")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    text = config["text_config"]
    text.update(use_sliding_window=True, sliding_window=4096, max_window_layers=0)
    text["layer_types"] = ["sliding_attention"] * text["num_hidden_layers"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_sliding_window_model_is_refused_before_loading(sliding_window_model_dir):
    """Several KV cache groups are seen in the model's config by create_engine_config (API
    server), before an EngineCore starts; scheduler.attach stays the backstop."""
    proc = run_cli(["serve", str(sliding_window_model_dir), *MEDA, "--max-model-len", "2048"])
    _assert_refused_before_loading(proc, "sliding-window attention layers")


def test_chunked_prefill_compresses_after_the_last_chunk(server_factory, none_server):
    """Long prompts split into many prefill chunks: the same memory saving (what they
    decode: test_oracle.py::test_chunked_prefill_decodes_like_the_oracle)."""
    chunked = ["--max-num-batched-tokens", "256", "--enable-chunked-prefill"]
    srv = server_factory("meda-chunked", [*MEDA, *chunked])
    base = held_after_prefill(none_server, [21, 22], "lower")
    comp = held_after_prefill(srv, [21, 22], "upper")
    print(f"chunked prefill: usage after prefill none={base:.4f} meda={comp:.4f}")
    assert comp / base <= 0.25


def test_preemption_recomputes_and_loses_no_request(server_factory):
    """A pool too small for the decode growth of compressed requests: vLLM preempts, the
    preempted requests are recomputed (uncompressed), all finish, nothing leaks."""
    pool = ["--kv-cache-memory-bytes", str(48 * 32 * 1024), "--max-model-len", "1024"]
    srv = server_factory("meda-tiny-pool", [*MEDA, *pool])
    fns = [
        (
            lambda s=s: chat(
                srv,
                [image_part(s, 448), text_part("Describe.")],
                max_tokens=400,
                ignore_eos=True,
            )
        )
        for s in range(6)
    ]
    results = run_concurrently(fns)
    assert all(r.usage.completion_tokens == 400 for r in results)
    m = wait_idle(srv)
    assert m.get("vllm:num_preemptions_total", 0) > 0, "the test did not cause a preemption"
    assert m["vllm:kv_cache_usage_perc"] == 0.0


def test_policy_none_is_stock_vllm(none_server):
    """--kv-policy none: no compression state, no meda: series, requests served."""
    r = chat(none_server, [image_part(5), text_part("What is in this image?")])
    assert r.usage.completion_tokens > 0
    assert not [k for k in none_server.metrics() if k.startswith("meda:")]
    assert "meda-vllm: KV compression on" not in none_server.tail(10_000)
