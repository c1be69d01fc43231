"""`vllm serve --kv-policy ...` on vLLM's GPU code path (Model Runner V2 + TRITON_ATTN),
run on CPU under the Triton interpreter (see server.py and shim/).

Interpreted Triton costs ~1.2 s per decode step here, so requests are few, short and
use small images (224x224 = 64 visual tokens, 448x448 = 256 with the tiny model).
"""

from __future__ import annotations

import pytest

from tests.e2e.client import chat, run_concurrently, skip_count, usage_after_prefill, wait_idle
from tests.e2e.media import image_part, text_part

pytestmark = [pytest.mark.gpu_path, pytest.mark.slow]

MAX_TOKENS = 3
MEDA = ["--kv-policy", "meda", "--kv-budget", "0.2"]
SERVERS = {
    # name: (flags, with the shim = GPU path)
    "none": (["--kv-policy", "none"], True),
    "meda-0.2": (MEDA, True),
    "cpu-none": (["--kv-policy", "none"], False),  # production CPU path, no shim
}

V2_RUNNERS = {
    "vllm.v1.worker.gpu.model_runner.GPUModelRunner",
    "vllm.v1.worker.cpu.model_runner.CPUModelRunner",  # the CPU platform's V2 subclass
}
TRITON_ATTENTION_KERNELS = {
    "vllm.v1.attention.ops.triton_unified_attention.kernel_unified_attention",
    "vllm.v1.attention.ops.triton_reshape_and_cache_flash.reshape_and_cache_kernel_flash",
}
V2_KERNEL_PREFIX = "vllm.v1.worker.gpu."  # Model Runner V2's own Triton kernels
MEDA_KERNELS = {
    "meda_vllm.kernels.gather._gather_kernel",
    "meda_vllm.kernels.window_scores._scores_kernel",
    "meda_vllm.kernels.split_stats._split_stats_kernel",  # scores + entropy, one launch
    "meda_vllm.kernels.entropy._entropy_combine_kernel",
    "meda_vllm.kernels.compact._write_kernel",
    # MEDA merges from the pages (paged_merge), not from dense torch copies of K/V
    "meda_vllm.kernels.match._match_kernel",
    "meda_vllm.kernels.merge._accumulate_kernel",
}


@pytest.fixture(scope="module")
def servers(start_servers):
    return start_servers(SERVERS)


def image_request(seed: int, side: int = 224) -> list[dict]:
    return [image_part(seed, side), text_part("Describe this picture in detail.")]


def complete(srv, content, max_tokens: int = MAX_TOKENS):
    r = chat(srv, content, max_tokens=max_tokens, ignore_eos=True)
    assert r.usage.completion_tokens == max_tokens, r
    return r


def assert_gpu_path(srv, meda: bool) -> dict[str, int]:
    """The worker ran Model Runner V2 with TRITON_ATTN (and meda's kernels when on)."""
    log = srv.log_text()
    rec = srv.worker_record()
    kernels = {k: v for k, v in rec["kernels"].items() if v > 0}
    assert rec["runner"] in V2_RUNNERS, rec["runner"]
    assert rec["attention_impls"] == ["TritonAttentionImpl"], rec["attention_impls"]
    assert "Using V2 Model Runner" in log
    assert kernels.keys() >= TRITON_ATTENTION_KERNELS, sorted(kernels)
    assert any(k.startswith(V2_KERNEL_PREFIX) for k in kernels), sorted(kernels)
    if meda:
        assert "backend TritonAttentionImpl" in log
        assert "meda-vllm: worker ready:" in log
        assert kernels.keys() >= MEDA_KERNELS, sorted(kernels)
    return kernels


def test_none_image_request_completes(servers):
    complete(servers["none"], image_request(0))


@pytest.mark.parametrize("name", ["none", "meda-0.2"])
def test_runs_model_runner_v2_with_triton_attention(servers, name):
    srv = servers[name]
    complete(srv, image_request(1))  # compressed on meda-0.2: 123 prompt tokens, budget 25
    kernels = assert_gpu_path(srv, meda=name.startswith("meda"))
    print(f"{name}: interpreted Triton kernels: {kernels}")
    if name.startswith("meda"):
        # layer sets: one merge launch per compressed request for all layers, not per layer
        compressed = wait_idle(srv).get("meda:requests_compressed_total", 0)
        assert compressed >= 1
        assert kernels["meda_vllm.kernels.match._match_kernel"] == compressed, kernels


def test_production_cpu_server_is_not_on_the_gpu_path(servers):
    """The comparison baseline really is the other path (V1 runner + CPU_ATTN)."""
    srv = servers["cpu-none"]
    complete(srv, image_request(0))
    log = srv.log_path.read_text(errors="replace")
    assert "Using V2 Model Runner" not in log


def test_meda_image_requests_complete_and_free_the_pool(servers):
    srv = servers["meda-0.2"]
    results = run_concurrently([lambda s=s: complete(srv, image_request(s)) for s in (2, 3)])
    assert len(results) == 2
    m = wait_idle(srv)
    assert m["vllm:num_requests_running"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0.0


def test_meda_kv_after_prefill_shrinks_to_budget(servers):
    """448x448 images: 315-token prompts, 20 blocks of 16; a 0.2 budget keeps ~63."""
    base = usage_after_prefill(
        servers["none"], lambda: complete(servers["none"], image_request(4, 448)), "lower"
    )
    comp = usage_after_prefill(
        servers["meda-0.2"], lambda: complete(servers["meda-0.2"], image_request(4, 448)), "upper"
    )
    ratio = comp / base
    print(f"GPU path: KV usage after prefill none={base:.4f} meda={comp:.4f} ratio={ratio:.3f}")
    assert base > 0
    assert ratio <= 0.25 + 1e-9
    assert wait_idle(servers["meda-0.2"])["vllm:kv_cache_usage_perc"] == 0.0


def greedy_tokens(srv, content, **xargs) -> list[str]:
    r = chat(srv, content, max_tokens=4, logprobs=True, ignore_eos=True, vllm_xargs=xargs or None)
    return [t.token for t in r.choices[0].logprobs.content]


def test_a_budget_of_one_leaves_the_request_alone_on_both_paths(servers):
    """Budget 1.0 (asked per request of the MEDA server) compresses nothing (skipped as
    short_prompt) and gives stock tokens; the GPU path's stock tokens equal the production
    CPU path's. What compressed requests decode on this path: test_gpu_path_oracle.py."""
    meda = servers["meda-0.2"]
    before = skip_count(meda, "short_prompt")
    prompts = {
        "image": image_request(6),
        "text": [text_part("Tell me a story about a cat.")],
    }
    for kind, content in prompts.items():
        tokens = {name: greedy_tokens(servers[name], content) for name in ("none", "cpu-none")}
        tokens["meda-1.0"] = greedy_tokens(meda, content, kv_budget=1.0)
        assert len(tokens["meda-1.0"]) == 4, tokens
        assert tokens["meda-1.0"] == tokens["none"] == tokens["cpu-none"], (kind, tokens)
    assert skip_count(meda, "short_prompt") == before + len(prompts)
