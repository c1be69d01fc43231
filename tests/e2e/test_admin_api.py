"""The admin API (``meda_vllm/vllm_adapter/admin.py``) on a real CPU server with
``--api-key``: read the settings, change them for new requests (seen in the next request's
kept tokens and freed pages, as the scheduler counts them on /metrics), totals that agree
with /metrics, a per-request record, 401 without the key, one-line 400s for bad changes."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from tests.e2e.client import chat, wait_idle
from tests.e2e.media import image_part, text_part
from tests.e2e.server import VLLMServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEY = "admin-test-key"
FREED = "meda:kv_blocks_freed_total"


@pytest.fixture(scope="module")
def admin_server(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("admin")
    flags = ["--kv-policy", "snapkv", "--kv-budget", "0.2", "--api-key", KEY]
    env = {"VLLM_PLUGINS": "meda_vllm,meda_vllm_admin"}
    with VLLMServer(tiny_model_dir, flags, logs / "server.log", env=env) as srv:
        srv.api_key = KEY
        yield srv


def api(srv, method: str, path: str, key: str | None = KEY, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.request(method, srv.url + "/v1/kv" + path, headers=headers, timeout=30,
                            **kwargs)  # fmt: skip


def compressed(srv, xargs: dict | None = None) -> dict:
    """One two-image request; the admin API's record of it once both the worker (kept
    tokens) and the scheduler (freed pages) have written theirs."""
    rid = uuid.uuid4().hex
    content = [image_part(3, 448), image_part(4, 448), text_part("Compare them.")]
    answer = chat(srv, content, max_tokens=4, request_id=rid, vllm_xargs=xargs)
    deadline = time.time() + 30
    while True:
        got = api(srv, "GET", f"/requests/{answer.id}")
        record = got.json() if got.status_code == 200 else {}
        if record.get("blocks_freed") is not None and record.get("kept_tokens") is not None:
            return record
        assert time.time() < deadline, (got.status_code, got.text)
        time.sleep(0.2)


def test_the_admin_api_reads_changes_and_reports_compression(admin_server):
    srv = admin_server
    assert api(srv, "GET", "/policy", key=None).status_code == 401
    assert api(srv, "GET", "/policy", key="wrong").status_code == 401
    policy = api(srv, "GET", "/policy").json()
    assert (policy["policy"], policy["budget"], policy["changed_at_run_time"]) == (
        "snapkv", 0.2, {})  # fmt: skip
    block_size = int(srv.info_labels("vllm:cache_config_info")["block_size"])

    before = srv.metrics().get(FREED, 0.0)
    first = compressed(srv)
    n = first["prompt_tokens"]
    assert first["policy"] == "snapkv" and first["kept_tokens"] == -(-n // 5)  # 0.2
    assert first["blocks_after"] == -(-first["kept_tokens"] // block_size)
    assert first["blocks_freed"] == first["blocks_before"] - first["blocks_after"] > 0

    changed = api(srv, "PUT", "/policy", json={"kv_budget": 0.5})
    assert changed.status_code == 200, changed.text
    assert changed.json()["budget"] == 0.5 and changed.json()["changed_at_run_time"] == {
        "kv_budget": 0.5}  # fmt: skip
    assert api(srv, "GET", "/policy").json()["budget"] == 0.5
    second = compressed(srv)
    assert second["prompt_tokens"] == n and second["kept_tokens"] == -(-n // 2)
    assert second["blocks_after"] > first["blocks_after"]
    assert second["blocks_freed"] < first["blocks_freed"]
    # the scheduler's own count of freed pages moved by exactly what the records say
    deadline = time.time() + 30
    want = before + first["blocks_freed"] + second["blocks_freed"]
    while srv.metrics().get(FREED, 0.0) != want:
        assert time.time() < deadline, (srv.metrics().get(FREED), want)
        time.sleep(0.2)
    own = compressed(srv, {"kv_budget": 0.1})  # a request's own setting still wins
    assert own["kept_tokens"] == -(-n // 10)

    for body, words in (
        ({"kv_budget": 7.5}, "kv_budget"),
        ({"kv_policy": "nope"}, "kv_policy"),
        ({"kv_layer_groups": 2}, "server-wide"),
        ({"budget": 0.3}, "kv_*"),
        ({}, "no setting"),
    ):
        bad = api(srv, "PUT", "/policy", json=body)
        assert bad.status_code == 400, (body, bad.status_code, bad.text)
        message = bad.json()["error"]["message"]
        assert words in message and "\n" not in message, (body, message)
    assert api(srv, "PUT", "/policy", data="not json").status_code in (400, 422)
    assert api(srv, "GET", "/policy").json()["budget"] == 0.5  # refused changes left no trace

    wait_idle(srv)
    deadline = time.time() + 30
    while (stats := api(srv, "GET", "/stats").json())["requests_compressed"] < 3:
        assert time.time() < deadline, stats  # the metrics are written coalesced
        time.sleep(0.2)
    m = srv.metrics()
    assert stats["requests_compressed"] == m["meda:requests_compressed_total"] == 3
    assert stats["kv_blocks_freed"] == m[FREED]
    assert stats["kv_tokens_before"] == m["meda:kv_tokens_before_total"]
    assert stats["kv_tokens_after"] == m["meda:kv_tokens_after_total"]
    assert stats["compression_seconds"]["count"] == 3
    assert 0 < stats["compression_seconds"]["p50_seconds"] <= 10
    assert m["meda:policy_changes_total"] == 1
    assert api(srv, "GET", "/requests/nope").status_code == 404
    paths = requests.get(srv.url + "/openapi.json", timeout=30).json()["paths"]
    assert {"put", "get"} <= set(paths["/v1/kv/policy"]), paths["/v1/kv/policy"]
    assert {"/v1/kv/stats", "/v1/kv/requests/{request_id}"} <= set(paths)
    assert chat(srv, [text_part("still serving?")], max_tokens=2).usage.completion_tokens == 2
