"""Bad input with compression on, table-driven: each per-request case is a 4xx whose
message is one line naming what is wrong, and the server answers a good request right
after it (startup refusals: tests/e2e/test_serve.py, test_bad_flags_fail_at_startup...)."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
import requests

from tests.e2e.media import image_part, mp4_data_url, png_data_url, text_part

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LIMITS = '{"image": 2, "video": 1}'


@pytest.fixture(scope="module")
def bad_input_server(server_factory):
    return server_factory(
        "bad-input",
        ["--kv-policy", "meda", "--kv-budget", "0.2", "--limit-mm-per-prompt", LIMITS],
    )


def _truncated_png() -> str:
    url = png_data_url(1, 64)
    raw = base64.b64decode(url.split(",", 1)[1])
    return "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()


def _huge_png() -> str:
    """A 2,400 x 2,400 image: more visual tokens than --max-model-len 4096."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2400, 2400), (120, 30, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


PICTURE = [image_part(0), text_part("What is in this image?")]

#: (id, request body fields over the defaults, what the one-line message must contain)
SETTINGS = [
    ("unknown policy", {"kv_policy": "bogus"}, "kv_policy"),
    ("budget 0", {"kv_budget": 0}, "kv_budget"),
    ("budget -1", {"kv_budget": -1}, "kv_budget"),
    ("budget 1.5", {"kv_budget": 1.5}, "kv_budget"),
    ("budget abc", {"kv_budget": "abc"}, "kv_budget"),
    ("budget NaN", {"kv_budget": float("nan")}, "kv_budget"),
    ("window 1.5", {"kv_window": 1.5}, "kv_window"),
    ("budget list", {"kv_budget": [0.2]}, "kv_budget"),
    ("budget over max-model-len", {"kv_budget": 100000}, "--max-model-len"),
    ("budget under the layer minimum", {"kv_budget": 3}, "kv_min_tokens_per_layer"),
    ("window 0", {"kv_window": 0}, "kv_window"),
    ("window text", {"kv_window": "x"}, "kv_window"),
    ("pooling", {"kv_pooling": "bogus"}, "kv_pooling"),
    ("pool kernel 0", {"kv_pool_kernel": 0}, "kv_pool_kernel"),
    ("pool kernel 64", {"kv_pool_kernel": 64}, "kv_pool_kernel"),
    ("merge", {"kv_merge": "bogus"}, "kv_merge"),
    ("minimum per layer 0", {"kv_min_tokens_per_layer": 0}, "kv_min_tokens_per_layer"),
    ("a policy knob out of range", {"kv_madakv_theta": 2}, "kv_madakv_theta"),
    ("a policy knob of the wrong type", {"kv_meda_recent_fraction": "x"}, "kv_meda_recent"),
    ("unknown setting", {"kv_foo": 1}, "kv_foo"),
    ("server-wide layer groups", {"kv_layer_groups": 2}, "server-wide"),
    ("server-wide workspace", {"kv_workspace_bytes": 1 << 20}, "server-wide"),
]

#: (id, messages, extra body fields, what the message must contain)
REQUESTS = [
    ("empty messages", [], {}, "empty conversation"),
    ("max_tokens 0", [{"role": "user", "content": PICTURE}], {"max_tokens": 0}, "max_tokens"),
    (
        "more images than the limit",
        [{"role": "user", "content": [image_part(1), image_part(2), image_part(3)]}],
        {},
        "image",
    ),
    (
        "malformed image data",
        [{"role": "user", "content": [_image("data:image/png;base64,%%%not-base64")]}],
        {},
        "",
    ),
    ("truncated image", [{"role": "user", "content": [_image(_truncated_png())]}], {}, ""),
    (
        "video with zero frames",
        [{"role": "user", "content": [_video(mp4_data_url(0, 64))]}],
        {},
        "",
    ),
]

#: Bad requests vLLM itself answers with HTTP 500 (its media loaders raise RuntimeError /
#: ValueError it does not map to 400): the same answer with compression on, no crash.
VLLM_500 = [
    ("local file url", [_image("file:///etc/passwd")]),
    ("image bytes as a video", [_video(png_data_url(2))]),
]


def _post(srv, body: dict) -> requests.Response:
    # json.dumps writes NaN as the literal NaN, as a careless client would
    return requests.post(
        srv.url + "/v1/chat/completions",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=120,
    )


def _body(srv, messages, **extra) -> dict:
    model = requests.get(srv.url + "/v1/models", timeout=30).json()["data"][0]["id"]
    return {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, **extra}


def _assert_serving(srv) -> None:
    """A good request right after: text, and the picture the bad requests carried (a
    request refused after its images entered the API server's cache must not leave the
    engine without them)."""
    for content in ("Say hi.", PICTURE):
        good = _post(srv, _body(srv, [{"role": "user", "content": content}]))
        assert good.status_code == 200, good.text[:500]
        assert good.json()["usage"]["completion_tokens"] >= 1


def _assert_refused_then_serving(srv, body: dict, words: str) -> None:
    got = _post(srv, body)
    assert 400 <= got.status_code < 500, (got.status_code, got.text[:500])
    message = got.json()["error"]["message"]
    assert words in message, message
    assert "\n" not in message.strip(), message
    _assert_serving(srv)


@pytest.mark.parametrize("xargs, words", [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS])
def test_a_bad_per_request_setting_is_a_400_naming_it(bad_input_server, xargs, words):
    body = _body(bad_input_server, [{"role": "user", "content": PICTURE}], vllm_xargs=xargs)
    _assert_refused_then_serving(bad_input_server, body, words)


@pytest.mark.parametrize(
    "messages, extra, words", [c[1:] for c in REQUESTS], ids=[c[0] for c in REQUESTS]
)
def test_a_bad_request_is_a_4xx_and_the_server_keeps_serving(
    bad_input_server, messages, extra, words
):
    body = _body(bad_input_server, messages, **extra)
    _assert_refused_then_serving(bad_input_server, body, words)


@pytest.mark.parametrize("content", [c[1] for c in VLLM_500], ids=[c[0] for c in VLLM_500])
def test_what_vllm_itself_refuses_with_500_stays_the_same_with_compression_on(
    bad_input_server, server_factory, content
):
    stock = server_factory("none", ["--kv-policy", "none"])
    answers = [_post(s, _body(s, [{"role": "user", "content": content}])) for s in (
        stock, bad_input_server)]  # fmt: skip
    assert [a.status_code for a in answers] == [500, 500], [a.text[:300] for a in answers]
    assert answers[0].json()["error"]["message"] == answers[1].json()["error"]["message"]
    _assert_serving(bad_input_server)


def test_a_huge_image_is_resized_by_the_processor_and_compressed(bad_input_server):
    srv = bad_input_server
    before = srv.metrics().get("meda:requests_compressed_total", 0.0)
    body = _body(srv, [{"role": "user", "content": [_image(_huge_png()), text_part("Hi")]}])
    got = _post(srv, body)
    assert got.status_code == 200, got.text[:500]
    assert got.json()["usage"]["prompt_tokens"] > 500
    deadline = time.time() + 30  # the worker's metrics are written coalesced
    while srv.metrics().get("meda:requests_compressed_total", 0.0) == before:
        assert time.time() < deadline
        time.sleep(0.2)
    _assert_serving(srv)
