"""Decode cost of per-layer physical lengths: `kv_layer_groups` G against G = 1.

One `vllm serve` at a time (same model, same flags but G): the 4-layer tiny Qwen2-VL with
per-layer query scales (budgets differ across layers, as in tests/e2e/test_layer_groups.py),
MEDA at 0.2. For each G: warm-up, then ``--batch`` image requests sent at once, each
streaming ``--tokens`` tokens (ignore_eos). Reported: the median gap between streamed
tokens while every request of the batch decodes (after the last first token, before the
first last token: no prefill step, equal batch), and its ratio to G = 1's in the same
run, in rounds alternating the servers so drift hits every G alike.

    .venv/bin/python benchmarks/layer_groups_decode.py --groups 1,2,4 --rounds 3

No download: the model is built from config classes. CPU figures are for this machine's
eager CPU runner; on a GPU the per-group cost (one attention-metadata build and one slot
mapping per group per step) is host work, to be measured there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meda_vllm.testing.tiny_qwen2vl import ensure  # noqa: E402
from tests.e2e.client import client, run_concurrently, wait_idle  # noqa: E402
from tests.e2e.media import image_part, text_part  # noqa: E402
from tests.e2e.server import VLLMServer  # noqa: E402
from tests.oracle.check import SHARP_Q_SCALES  # noqa: E402

ITL = "vllm:inter_token_latency_seconds"


def request(seed: int) -> list[dict]:
    return [image_part(seed, 448), image_part(seed + 1, 448), text_part("Compare them.")]


def stream_times(srv: VLLMServer, content: list[dict], tokens: int) -> list[float]:
    """Arrival time of each streamed token of one greedy request (ignore_eos)."""
    c = client(srv)
    model = c.models.list().data[0].id
    times = []
    stream = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    return times


def measure(srv: VLLMServer, batch: int, tokens: int, seed: int) -> float:
    """Median decode step time (ms) while all ``batch`` requests decode: the gaps between
    streamed tokens after the last request's first token and before the first request's
    last token (so no step of the window runs a prefill, and the batch is full)."""
    fns = [
        (lambda s=s: stream_times(srv, request(s), tokens))
        for s in range(seed, seed + 2 * batch, 2)
    ]
    runs = run_concurrently(fns)
    start = max(t[0] for t in runs)
    end = min(t[-1] for t in runs)
    gaps = [b - a for t in runs for a, b in zip(t, t[1:], strict=False) if a >= start and b <= end]
    if len(gaps) < batch:
        raise RuntimeError(f"only {len(gaps)} decode gaps at full batch; raise --tokens")
    wait_idle(srv)
    return 1e3 * statistics.median(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default="1,2,4", help="kv_layer_groups values (1 first)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model-dir", default=None, help="where to build the model (a temp dir)")
    args = ap.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    if groups[0] != 1:
        raise SystemExit("--groups must start with 1 (the baseline)")
    tmp = Path(tempfile.mkdtemp(prefix="meda-bench-"))
    model = ensure(
        Path(args.model_dir) if args.model_dir else tmp / "model",
        num_layers=len(SHARP_Q_SCALES),
        q_scales=SHARP_Q_SCALES,
    )
    runs: dict[int, list[float]] = {g: [] for g in groups}
    for rnd in range(args.rounds):
        for g in groups:
            flags = ["--kv-policy", "meda", "--kv-budget", "0.2", "--max-num-seqs", "32"]
            flags += ["--kv-policy-config", json.dumps({"kv_layer_groups": g})]
            print(f"[bench] round {rnd + 1}/{args.rounds}: G = {g}: starting", flush=True)
            with VLLMServer(model, flags, tmp / f"server-g{g}-r{rnd}.log") as srv:
                run_concurrently([lambda: stream_times(srv, request(1000), 8)] * 2)  # warm-up
                got = measure(srv, args.batch, args.tokens, seed=0)
            runs[g].append(got)
            print(f"[bench]   decode step {got:.2f} ms", flush=True)
    base = statistics.median(runs[1])
    print(f"\nbatch {args.batch}, {args.tokens} tokens each, medians of {args.rounds} rounds")
    print("| G | decode step, median (ms) | per round (ms) | ratio to G = 1 |")
    print("|---|---|---|---|")
    for g in groups:
        itl = statistics.median(runs[g])
        rounds = ", ".join(f"{r:.2f}" for r in runs[g])
        print(f"| {g} | {itl:.2f} | {rounds} | {itl / base:.3f} |")


if __name__ == "__main__":
    main()
