"""A server with an explicit ``kv_workspace_bytes``: one startup log line, the
``meda:workspace_bytes`` gauge on /metrics, requests still compressed, the setting refused
as a per-request override (one extra real `vllm serve` on the tiny Qwen2-VL)."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.e2e.client import chat, wait_idle
from tests.e2e.media import image_part, text_part

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKSPACE = 12 << 20
FLAGS = [
    "--kv-policy", "meda", "--kv-budget", "0.2",
    "--kv-policy-config", json.dumps({"kv_workspace_bytes": WORKSPACE}),
]  # fmt: skip


@pytest.fixture(scope="module")
def ws_server(server_factory):
    return server_factory("meda-workspace", FLAGS)


def test_workspace_is_logged_exported_and_requests_still_compress(ws_server):
    log = ws_server.log_path.read_text()
    lines = [ln for ln in log.splitlines() if "meda-vllm: compression workspace" in ln]
    assert len(lines) == 1, lines
    assert "12.0 MiB (set), on top of --kv-cache-memory-bytes: KV cache 64.0 MiB" in lines[0]
    before = ws_server.metrics()
    assert before.get("meda:workspace_bytes") == WORKSPACE
    content = [image_part(1, 896), text_part("Describe this picture in detail.")]
    r = chat(ws_server, content, max_tokens=8)
    assert r.usage.completion_tokens > 0
    deadline = time.time() + 10
    while True:
        after = wait_idle(ws_server)
        if (
            after.get("meda:requests_compressed_total", 0)
            > before.get("meda:requests_compressed_total", 0)
            or time.time() > deadline
        ):
            break
        time.sleep(0.3)
    assert after.get("meda:requests_compressed_total", 0) == (
        before.get("meda:requests_compressed_total", 0) + 1
    )
    # not skipped (no reason at all: the one request above was compressed)
    assert after.get("meda:requests_skipped_total", 0) == before.get("meda:requests_skipped_total")


def test_workspace_cannot_be_set_per_request(ws_server):
    content = [image_part(0), text_part("What is in this image?")]
    with pytest.raises(openai.BadRequestError) as exc:
        chat(ws_server, content, vllm_xargs={"kv_workspace_bytes": 1 << 30})
    assert "kv_workspace_bytes is a server-wide setting" in str(exc.value)
