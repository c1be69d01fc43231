"""What compressed requests decode on vLLM's GPU code path (Model Runner V2 + TRITON_ATTN,
meda's Triton kernels, all under the interpreter), checked against the reference oracle
(tests/oracle). Small prompts: interpreted Triton costs seconds per step."""

from __future__ import annotations

import os

import pytest

from tests.e2e.client import skip_count, wait_idle
from tests.gpu_path.server import GpuPathServer
from tests.gpu_path.test_gpu_path import V2_RUNNERS
from tests.oracle import check

pytestmark = [pytest.mark.gpu_path, pytest.mark.slow]

SERVER = {"kv_policy": "meda", "kv_budget": 0.2}
FLAGS = [
    *("--kv-policy", "meda", "--kv-budget", "0.2"),
    *("--max-num-seqs", "32", "--limit-mm-per-prompt", '{"image": 2, "video": 1}'),
    # room for all 28 requests at once: a compressed request preempted and recomputed
    # would decode uncompressed
    *("--kv-cache-memory-bytes", str(64 * 1024 * 1024)),
]


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-path-plan-dump")


@pytest.fixture(scope="module")
def v2_server(sharp_model_dir, dump_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gpu-path-oracle")
    fault_file = logs / "fault"
    fault_file.write_text("")
    srv = GpuPathServer(sharp_model_dir, FLAGS, logs / "server.log", logs / "kernels")
    srv.env["PYTHONPATH"] = os.pathsep.join((str(check.SHIM), srv.env["PYTHONPATH"]))
    srv.env["MEDA_VLLM_PLAN_DUMP"] = str(dump_dir)
    srv.env["MEDA_TEST_FAULT_FILE"] = str(fault_file)
    with srv:
        srv.fault_file = fault_file
        yield srv


#: MEDA_ORACLE_FULL=1: every policy x {0.2, 40} x {text, images, video} (42 requests,
#: ~45 min here). By default one request per policy (``DEFAULT``: 7 requests, one
#: batch): this path's own concern is the V2 block tables
#: and the Triton kernels, whose inputs are the same for a ratio and a token budget; the
#: production CPU path runs the whole matrix (tests/e2e/test_oracle.py).
FULL = os.environ.get("MEDA_ORACLE_FULL") == "1"
#: small prompts (36 tokens per image, 72 for the clip): interpreted Triton costs about
#: a second per decode step and request
CASES = check.cases(side=168, video_size=168)


#: the default requests: (policy, budget, kind), each kind and budget several times,
#: MEDA and MadaKV on multimodal prompts
DEFAULT = [
    ("snapkv", 0.2, "text"),
    ("pyramidkv", 40, "images"),
    ("h2o", 0.2, "video"),
    ("streamingllm", 40, "text"),
    ("lookm", 0.2, "video"),
    ("meda", 0.2, "images"),
    ("madakv", 40, "video"),
]


def jobs() -> list[check.Job]:
    if FULL:
        return check.matrix(check.EVICTING, check.BUDGETS, CASES)
    return [
        job
        for policy, budget, kind in DEFAULT
        for job in check.matrix([policy], [budget], {kind: CASES[kind]})
    ]


@pytest.fixture(scope="module")
def answered(v2_server):
    """The requests sent in waves of 7 (each wave one batch in the server, well inside the
    client's timeout), then checked one by one per policy."""
    v2_server.fault_file.write_text("")
    todo = jobs()
    answers = []
    for start in range(0, len(todo), 7):
        answers += check.send_all(v2_server, todo[start : start + 7])
    return todo, answers


@pytest.mark.parametrize("policy", check.EVICTING)
def test_compressed_requests_decode_like_the_oracle_on_v2(
    v2_server, answered, oracle, dump_dir, policy
):
    """As tests/e2e/test_oracle.py, through the V2 runner's block tables and slot mappings
    and the paged Triton kernels (scores, entropy, merging, compaction)."""
    jobs, answers = answered
    mine = [(j, a) for j, a in zip(jobs, answers, strict=True) if j.policy == policy]
    problems = check.verify_all(*zip(*mine, strict=True), oracle, dump_dir, SERVER)
    assert not problems, "\n".join(problems)
    assert v2_server.worker_record()["runner"] in V2_RUNNERS


@pytest.mark.parametrize("fault", ["kept_index", "slot_shift"])
def test_a_broken_plugin_fails_the_oracle_on_v2(v2_server, oracle, dump_dir, fault):
    v2_server.fault_file.write_text(fault)
    try:
        content = CASES["images"]
        xargs = {"kv_policy": "snapkv", "kv_window": check.WINDOW}
        found = check.check_compressed(v2_server, oracle, dump_dir, content, SERVER, xargs)
        assert any("logprobs differ" in p or "tokens differ" in p for p in found), found
    finally:
        v2_server.fault_file.write_text("")


@pytest.mark.parametrize("stage", ["plan", "compact"])
def test_a_failure_in_one_request_leaves_v2_serving(v2_server, oracle, dump_dir, stage):
    """Planning fails (served uncompressed) / compaction fails after rewriting the pages
    (preempted, V2 frees its row, recomputed uncompressed): the stock answer either way,
    counted, and the pool is fully free afterwards."""
    content = CASES["images"]
    before = skip_count(v2_server, "error")
    v2_server.fault_file.write_text(f"raise_{stage}")
    try:
        answer = check.ask(v2_server, content, {"kv_policy": "meda", "kv_window": check.WINDOW})
    finally:
        v2_server.fault_file.write_text("")
    full = oracle.run(content, None, len(answer.tokens))
    assert not check.mismatches(answer, full), stage
    assert skip_count(v2_server, "error") == before + 1, v2_server.tail(80)
    assert wait_idle(v2_server)["vllm:kv_cache_usage_perc"] == 0.0
