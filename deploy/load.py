"""Send a mix of chat requests to a vLLM server, so the meda-vllm dashboard has data.

Waves of concurrent requests: long images (1024 visual tokens with Qwen2-VL's processor
at 896x896), small and paired images, text only, and per-request overrides
(``vllm_xargs``: ``kv_policy: none``, another policy, a budget above the prompt length)
so every skip reason and fallback shows up. Standard library + numpy + Pillow only.

    python deploy/load.py --url http://127.0.0.1:8000 --duration 120
    python deploy/load.py --url http://vllm:8000 --forever          (the CPU compose)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import threading
import time
import urllib.request


def image_part(seed: int, side: int = 224) -> dict:
    import numpy as np
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def request_mix(i: int) -> tuple[list[dict], dict]:
    """Content and extra body of the i-th request."""
    kind = i % 8
    if kind in (0, 1, 2):
        return [image_part(i, 896), text_part("Describe this picture in detail.")], {}
    if kind == 3:
        return [image_part(i), image_part(i + 1, 448), text_part("Compare them.")], {}
    if kind == 4:
        return [text_part("Tell me a long story about a cat who learns to fly. " * 4)], {}
    if kind == 5:
        return [image_part(i, 448), text_part("What is this?")], {
            "vllm_xargs": {"kv_policy": "none"}
        }
    if kind == 6:
        return [image_part(i), text_part("Go.")], {"vllm_xargs": {"kv_budget": 100000}}
    return [image_part(i, 672), text_part("Summarise.")], {"vllm_xargs": {"kv_policy": "snapkv"}}


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def model_name(base: str) -> str:
    with urllib.request.urlopen(base + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def one(base: str, model: str, i: int, max_tokens: int) -> None:
    content, extra = request_mix(i)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    post(base + "/v1/chat/completions", body)


def run(
    base: str,
    duration: float | None,
    concurrency: int,
    max_tokens: int,
    pause: float,
    seed: int = 0,
) -> int:
    """Send waves of ``concurrency`` requests until ``duration`` seconds passed; return count."""
    model = model_name(base)
    rng = random.Random(seed)
    start, sent, i = time.time(), 0, 0
    errors: list[BaseException] = []
    while duration is None or time.time() - start < duration:
        wave = []
        for _ in range(concurrency):
            n = max_tokens + rng.randint(0, max_tokens)

            def task(i=i, n=n):
                try:
                    one(base, model, i, n)
                except Exception as e:  # noqa: BLE001 - keep the load going; report below
                    errors.append(e)

            wave.append(threading.Thread(target=task))
            i += 1
        for t in wave:
            t.start()
        for t in wave:
            t.join()
        sent += len(wave)
        print(
            f"[load] {sent} requests, {len(errors)} errors, {time.time() - start:.0f}s", flush=True
        )
        time.sleep(pause * rng.random())
    if errors:
        print(f"[load] first error: {errors[0]!r}", file=sys.stderr)
    return sent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--duration", type=float, default=120, help="seconds (ignored with --forever)")
    ap.add_argument("--forever", action="store_true")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--pause", type=float, default=4.0, help="max seconds between waves")
    args = ap.parse_args(argv)
    run(
        args.url.rstrip("/"),
        None if args.forever else args.duration,
        args.concurrency,
        args.max_tokens,
        args.pause,
    )


if __name__ == "__main__":
    main()
