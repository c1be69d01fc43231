"""What compressed requests decode, checked against the reference oracle (production CPU
path: V1 runner + CPU_ATTN). See tests/oracle/reference.py for the oracle."""

from __future__ import annotations

import pytest

from tests.e2e.client import run_concurrently, skip_count, wait_idle
from tests.e2e.server import VLLMServer
from tests.oracle import check
from tests.oracle.reference import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVER = {"kv_policy": "meda", "kv_budget": 0.2}
SERVER_FLAGS = ["--kv-policy", "meda", "--kv-budget", "0.2"]


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-dump")


@pytest.fixture(scope="module")
def comp_server(sharp_model_dir, dump_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "oracle-meda.log"
    env = {"MEDA_VLLM_PLAN_DUMP": str(dump_dir)}
    with VLLMServer(sharp_model_dir, SERVER_FLAGS, log, env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def fault_server(sharp_model_dir, dump_dir, tmp_path_factory):
    """Chunked prefill (64-token chunks), and the fault shim: ``fault_file`` picks the fault."""
    logs = tmp_path_factory.mktemp("logs")
    env, fault_file = check.fault_env(logs, dump_dir)
    chunked = ["--max-num-batched-tokens", "64", "--enable-chunked-prefill"]
    with VLLMServer(
        sharp_model_dir, [*SERVER_FLAGS, *chunked], logs / "oracle-fault.log", env=env
    ) as srv:
        srv.fault_file = fault_file
        yield srv


@pytest.fixture(scope="module")
def stock_server(sharp_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "oracle-none.log"
    with VLLMServer(sharp_model_dir, ["--kv-policy", "none"], log) as srv:
        yield srv


def test_compression_is_set_up_when_the_engine_starts(comp_server):
    """Layers, page layouts, attention hooks and the workspace are set up while the engine
    starts (a failure there stops the start), not on the first request."""
    log = comp_server.tail(100_000)
    assert "meda-vllm: worker ready" in log
    assert "compression workspace" in log
    assert "POST /v1/chat/completions" not in log


@pytest.mark.parametrize("policy", check.EVICTING)
def test_compressed_requests_decode_like_the_oracle(comp_server, oracle, dump_dir, policy):
    """Text-only, multi-image and video requests at a 0.2 ratio and at 40 tokens: the kept
    positions of every layer and KV head, the greedy tokens and their logprobs equal the
    oracle's (which plans from its own prefill tensors)."""
    problems = check.check_matrix(comp_server, oracle, dump_dir, SERVER, policy, check.cases(448))
    assert not problems, "\n".join(problems)


def test_oracle_without_eviction_is_stock_vllm(stock_server, oracle: Oracle):
    """The oracle itself: with nothing evicted it decodes what `--kv-policy none` does; and
    compression moves its logprobs far beyond the tolerance (the check can tell)."""
    moved = []
    for name, content in check.cases(448).items():
        answer = check.ask(stock_server, content, None)
        full = oracle.run(content, None, len(answer.tokens))
        assert not check.mismatches(answer, full), name
        cfg = check.request_config(SERVER, {"kv_window": check.WINDOW})
        comp = oracle.run(content, cfg, len(answer.tokens))
        moved.append(max(abs(a - b) for a, b in zip(comp.logprobs, full.logprobs, strict=True)))
    assert min(moved) > 10 * check.LOGPROB_TOL, moved


def test_chunked_prefill_decodes_like_the_oracle(fault_server, oracle, dump_dir):
    """Prompts prefilled in 64-token chunks: query rows captured across chunks."""
    fault_server.fault_file.write_text("")
    cases = check.cases(448)
    problems = []
    for policy in ("snapkv", "meda", "h2o"):
        for name in ("images", "video"):
            xargs = {"kv_policy": policy, "kv_window": check.WINDOW}
            found = check.check_compressed(
                fault_server, oracle, dump_dir, cases[name], SERVER, xargs
            )
            problems += [f"{policy} {name}: {p}" for p in found]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("fault", ["kept_index", "slot_shift"])
def test_a_broken_plugin_fails_the_oracle(fault_server, oracle, dump_dir, fault):
    """One kept index moved in compaction, or decode slots one token short: the oracle
    check must report it, for every request kind."""
    fault_server.fault_file.write_text(fault)
    try:
        for name, content in check.cases(448).items():
            xargs = {"kv_policy": "snapkv", "kv_window": check.WINDOW}
            found = check.check_compressed(fault_server, oracle, dump_dir, content, SERVER, xargs)
            assert any("logprobs differ" in p or "tokens differ" in p for p in found), (
                fault,
                name,
                found,
            )
    finally:
        fault_server.fault_file.write_text("")


@pytest.mark.parametrize("stage", ["plan", "merge", "compact", "truncate"])
def test_a_failure_in_one_request_leaves_the_engine_serving(fault_server, oracle, dump_dir, stage):
    """An exception while planning, merging, after compaction rewrote the pages, or while
    cutting the row: the failed request still gets the uncompressed answer (served as is,
    or preempted and recomputed when its pages were touched), a request beside it is
    unharmed, the failure is counted, the next compressed request decodes like the
    oracle, and the pool is fully free afterwards."""
    cases = check.cases(448)
    failing = {"kv_policy": "meda", "kv_window": check.WINDOW}  # meda merges
    before = skip_count(fault_server, "error")
    fault_server.fault_file.write_text(f"raise_{stage}")
    try:
        hit, beside = run_concurrently(
            [
                lambda: check.ask(fault_server, cases["images"], failing),
                lambda: check.ask(fault_server, cases["text"], {"kv_policy": "none"}),
            ]
        )
    finally:
        fault_server.fault_file.write_text("")
    for answer, name in ((hit, "images"), (beside, "text")):
        full = oracle.run(cases[name], None, len(answer.tokens))
        assert not check.mismatches(answer, full), (stage, name)
    assert skip_count(fault_server, "error") == before + 1, fault_server.tail(80)
    xargs = {"kv_policy": "snapkv", "kv_window": check.WINDOW}
    found = check.check_compressed(fault_server, oracle, dump_dir, cases["video"], SERVER, xargs)
    assert not found, found
    assert wait_idle(fault_server)["vllm:kv_cache_usage_perc"] == 0.0
