"""Per-layer physical lengths (``kv_layer_groups``, issue #15): on the 4-layer model whose
layers attend with different sharpness, one KV cache group per layer. Each group holds only
its own kept tokens (the scheduler frees each group's tail), and what compressed requests
decode still equals the oracle's (which pads each group to its own largest budget)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.e2e.client import (
    MetricPeaks,
    by_label,
    chat,
    labelled,
    run_concurrently,
    skip_count,
    wait_idle,
)
from tests.e2e.media import image_part, text_part
from tests.e2e.server import VLLMServer
from tests.oracle import check

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GROUPS = 4  # one per layer of the sharp model
SERVER = {"kv_policy": "meda", "kv_budget": 0.2, "kv_layer_groups": GROUPS}
FLAGS = ["--kv-policy", "meda", "--kv-budget", "0.2",
         "--kv-policy-config", json.dumps({"kv_layer_groups": GROUPS})]  # fmt: skip
FREED = "meda:kv_blocks_freed_total"


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-dump-groups")


@pytest.fixture(scope="module")
def groups_server(sharp_model_dir, dump_dir, tmp_path_factory):
    """With the fault shim (tests/oracle/shim): ``fault_file`` picks the fault (none)."""
    logs = tmp_path_factory.mktemp("logs")
    env, fault_file = check.fault_env(logs, dump_dir)
    with VLLMServer(sharp_model_dir, FLAGS, logs / "layer-groups.log", env=env) as srv:
        srv.fault_file = fault_file
        yield srv


def _held_blocks(srv, dump_dir, content, policy) -> tuple[int, int, list[int]]:
    """(blocks the scheduler holds for the request after compression, the sum over groups
    of cdiv(kept, block size) from the worker's plan, the per-layer kept lengths)."""
    block_size, _ = srv.cache_geometry()
    before = srv.metrics().get(FREED, 0.0)
    answer = check.ask(srv, content, {"kv_policy": policy, "kv_window": check.WINDOW})
    wait_idle(srv)
    # the engine writes its meda metrics coalesced (metrics/recording.py): wait for the one
    # increment of this request's freed blocks
    deadline = time.time() + 30
    while (now := srv.metrics().get(FREED, 0.0)) == before and time.time() < deadline:
        time.sleep(0.2)
    freed = int(now - before)
    dump = check.load_dump(dump_dir, answer.request_id)
    assert dump is not None, "not compressed"
    n = dump["n_prompt"]
    kept = [int(k.shape[1]) for k in dump["kept"]]
    held = GROUPS * -(-n // block_size) - freed
    return held, sum(-(-p // block_size) for p in kept), kept


def _group_kept(srv) -> list[float]:
    return [labelled(srv, "meda:group_kept_tokens_total", "group", str(g)) for g in range(GROUPS)]


def _minus(a: list[float], b: list[float]) -> list[int]:
    return [int(x - y) for x, y in zip(a, b, strict=True)]


def test_each_layer_group_holds_only_its_own_kept_tokens(groups_server, dump_dir):
    """Per-layer budgets free real pages: MEDA, PyramidKV and MadaKV hold within 1.25x of
    SnapKV's pages on the same request (one physical length: 2-4x), and the pages the
    scheduler holds are exactly each group's own kept tokens, in blocks; the worker reports
    each group's physical length (``meda:group_kept_tokens_total``)."""
    content = check.cases(448)["images"]
    held = {}
    physical = [0] * GROUPS  # what meda:group_kept_tokens_total must add, group by group
    before = _group_kept(groups_server)
    for policy in ("snapkv", "pyramidkv", "meda", "madakv"):
        blocks, expected, kept = _held_blocks(groups_server, dump_dir, content, policy)
        assert blocks == expected, (policy, blocks, expected, kept)
        held[policy] = blocks
        physical = [p + k for p, k in zip(physical, kept, strict=True)]  # a layer per group
        if policy != "snapkv":
            assert len(set(kept)) > 1, (policy, kept)  # the budgets differ across layers
    for policy in ("pyramidkv", "meda", "madakv"):
        assert held[policy] <= 1.25 * held["snapkv"], held
    deadline = time.time() + 30  # the worker's metrics are written coalesced
    while (added := _minus(_group_kept(groups_server), before)) != physical:
        assert time.time() < deadline, (added, physical)
        time.sleep(0.2)
    assert wait_idle(groups_server)["vllm:kv_cache_usage_perc"] == 0.0


def test_the_pages_each_group_holds_are_published(groups_server, dump_dir):
    """``meda:group_blocks_held{group}`` while one MEDA request decodes: each group's own
    kept tokens plus what it decoded so far, in blocks (the groups differ); 0 when idle."""
    srv = groups_server
    block_size, _ = srv.cache_geometry()
    tokens = 96
    content = check.cases(448)["images"]
    done = threading.Event()
    answer = []

    def send():
        try:
            answer.append(check.ask(srv, content, {"kv_policy": "meda"}, max_tokens=tokens))
        finally:
            done.set()

    thread = threading.Thread(target=send)
    thread.start()
    seen = []  # scrapes while the request held pages in every group
    while not done.is_set():
        held = by_label(srv, "meda:group_blocks_held", "group")
        if len(held) == GROUPS and all(held.values()):
            seen.append([int(held[str(g)]) for g in range(GROUPS)])
        time.sleep(0.05)
    thread.join()
    dump = check.load_dump(dump_dir, answer[0].request_id)
    kept = [int(k.shape[1]) for k in dump["kept"]]  # one layer per group
    low = [-(-p // block_size) for p in kept]
    high = [-(-(p + tokens) // block_size) for p in kept]
    assert seen, "no scrape saw the request's pages"
    last = seen[-1]  # decoding: compressed long before its last token
    assert all(lo <= h <= hi for lo, h, hi in zip(low, last, high, strict=True)), (
        last, low, high, kept)  # fmt: skip
    assert len(set(last)) > 1, last
    deadline = time.time() + 30  # the scheduler's metrics are written coalesced
    while any(by_label(srv, "meda:group_blocks_held", "group").values()):
        assert time.time() < deadline, by_label(srv, "meda:group_blocks_held", "group")
        time.sleep(0.2)


@pytest.mark.parametrize("policy", check.EVICTING)
def test_per_layer_lengths_decode_like_the_oracle(groups_server, oracle, dump_dir, policy):
    """Every evicting policy, images and text, with one KV cache group per layer: kept
    positions, greedy tokens and logprobs equal the oracle's."""
    cases = check.cases(448)
    problems = []
    for name in ("images", "text"):
        xargs = {"kv_policy": policy, "kv_window": check.WINDOW}
        found = check.check_compressed(groups_server, oracle, dump_dir, cases[name], SERVER, xargs)
        problems += [f"{name}: {p}" for p in found]
    assert not problems, "\n".join(problems)


def test_a_compacted_per_layer_request_that_fails_is_recomputed(groups_server, oracle, dump_dir):
    """A failure after compaction rewrote every group's pages: the request is preempted and
    recomputed in full in every group, and decodes like the oracle without compression; the
    next per-layer-compressed request decodes like the oracle; the pool is fully free."""
    cases = check.cases(448)
    before = skip_count(groups_server, "error")
    groups_server.fault_file.write_text("raise_compact")
    try:
        hit = check.ask(groups_server, cases["images"], {"kv_policy": "meda"})
    finally:
        groups_server.fault_file.write_text("")
    assert not check.mismatches(hit, oracle.run(cases["images"], None, len(hit.tokens)))
    assert skip_count(groups_server, "error") == before + 1, groups_server.tail(80)
    xargs = {"kv_policy": "madakv", "kv_window": check.WINDOW}
    found = check.check_compressed(groups_server, oracle, dump_dir, cases["video"], SERVER, xargs)
    assert not found, found
    assert wait_idle(groups_server)["vllm:kv_cache_usage_perc"] == 0.0


#: long image requests: 8 images of 448x448 (256 visual tokens each), ~2,100 tokens
LONG_IMAGES = 8
#: 8 MiB: 4,096 tokens of all 4 layers (2 KiB a token: K and V, 2 KV heads of 32 fp32),
#: 128 blocks of 32 in one group: one request (66 blocks) fits uncompressed, two do not
POOL_BYTES = 8 * 1024 * 1024


def _long_request(seed: int) -> list[dict]:
    parts = [image_part(seed * 10 + i, 448) for i in range(LONG_IMAGES)]
    return [*parts, text_part("Describe these pictures.")]


def _peak_running(srv, n_requests: int, max_tokens: int, **xargs) -> float:
    """Long image requests sent at once: the most that ran at once; all must finish."""
    fns = [
        (lambda s=s: chat(srv, _long_request(s), max_tokens, ignore_eos=True, vllm_xargs=xargs))
        for s in range(n_requests)
    ]
    with MetricPeaks(srv, ["vllm:num_requests_running"], period=0.005) as polled:
        results = run_concurrently(fns)
    assert all(r.usage.completion_tokens == max_tokens for r in results)
    busy = sum(s.get("vllm:num_requests_running", 0) > 0 for s in polled.samples)
    # a poller the busy server starved would read a peak of 0 (CI once did at 32 tokens)
    assert busy >= 5, f"/metrics answered only {busy} times while requests ran"
    return polled.peaks["vllm:num_requests_running"]


def test_capacity_at_a_fixed_pool(sharp_model_dir, tmp_path_factory):
    """One pool (room for one long image request uncompressed, not two): MEDA at 0.2 with
    one KV cache group per layer runs at least 4x as many of them at once as the same
    requests asking for ``kv_policy: none`` (one physical length for all layers: about 2x,
    MEDA keeping 0.57 of the stock KV on this model). Then a decode too long for the pool:
    vLLM preempts per-layer-compressed requests, they are recomputed, all finish, and the
    pool is fully free."""
    flags = [*FLAGS, "--kv-cache-memory-bytes", str(POOL_BYTES), "--max-model-len", "3072",
             "--limit-mm-per-prompt", json.dumps({"image": LONG_IMAGES})]  # fmt: skip
    log = tmp_path_factory.mktemp("logs") / "capacity.log"
    with VLLMServer(sharp_model_dir, flags, log) as srv:
        peaks = {
            "none": _peak_running(srv, 6, 128, kv_policy="none"),
            "meda": _peak_running(srv, 12, 32),
        }
        print(f"peak running at one pool: {peaks}")
        assert peaks["none"] == 1, peaks
        assert peaks["meda"] >= 4 * peaks["none"], peaks
        assert wait_idle(srv)["vllm:kv_cache_usage_perc"] == 0.0
        _peak_running(srv, 8, 400)
        m = wait_idle(srv)
        assert m.get("vllm:num_preemptions_total", 0) > 0, "the test did not cause a preemption"
        assert m["vllm:kv_cache_usage_perc"] == 0.0
