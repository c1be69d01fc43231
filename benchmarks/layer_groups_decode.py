"""Decode cost of per-layer physical lengths: `kv_layer_groups` G against G = 1.

One `vllm serve` at a time (same model, same flags but G): the 4-layer tiny Qwen2-VL with
per-layer query scales (budgets differ across layers, as in tests/e2e/test_layer_groups.py),
MEDA at 0.2. For each G: warm-up, then ``--batch`` image requests sent at once, each
decoding ``--tokens`` tokens (ignore_eos). Reported: the mean inter-token latency from the
server's ``vllm:inter_token_latency_seconds`` (``measure``), and its ratio to G = 1's in
the same run, in rounds alternating the servers so drift hits every G alike.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meda_vllm.testing.tiny_qwen2vl import ensure  # noqa: E402
from tests.e2e.client import chat, run_concurrently, wait_idle  # noqa: E402
from tests.e2e.media import image_part, text_part  # noqa: E402
from tests.e2e.server import VLLMServer  # noqa: E402
from tests.oracle.check import SHARP_Q_SCALES  # noqa: E402

ITL = "vllm:inter_token_latency_seconds"


def request(seed: int) -> list[dict]:
    return [image_part(seed, 448), image_part(seed + 1, 448), text_part("Compare them.")]


def measure(srv: VLLMServer, batch: int, tokens: int, seed: int) -> float:
    """Mean inter-token latency (ms) of ``batch`` requests sent at once, from the server's
    own ``vllm:inter_token_latency_seconds`` (engine timestamps: the API server, which
    shares the cores, streams in bursts, so client-side times say nothing on this machine).
    The same requests run once before with 2 tokens each, so their images are in the API
    server's processor cache and the requests reach the engine close together; their few
    prefill steps weigh little against ``tokens`` decode steps each, and alike for every G.
    """
    fns = [
        (lambda s=s, n=n: chat(srv, request(s), max_tokens=n, ignore_eos=True))
        for n in (2, tokens)
        for s in range(seed, seed + 2 * batch, 2)
    ]
    run_concurrently(fns[:batch])  # warm the processor cache with these very images
    before = wait_idle(srv)
    results = run_concurrently(fns[batch:])
    assert all(r.usage.completion_tokens == tokens for r in results)
    after = wait_idle(srv)
    total = after[ITL + "_sum"] - before.get(ITL + "_sum", 0.0)
    count = after[ITL + "_count"] - before.get(ITL + "_count", 0.0)
    return 1e3 * total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", default="1,2,4", help="kv_layer_groups values (1 first)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
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
                measure(srv, 2, 8, seed=1000)  # warm-up
                got = measure(srv, args.batch, args.tokens, seed=0)
            runs[g].append(got)
            print(f"[bench]   inter-token latency {got:.2f} ms", flush=True)
    base = statistics.median(runs[1])
    print(f"\nbatch {args.batch}, {args.tokens} tokens each, medians of {args.rounds} rounds")
    print("| G | inter-token latency, median (ms) | per round (ms) | ratio to G = 1 |")
    print("|---|---|---|---|")
    for g in groups:
        itl = statistics.median(runs[g])
        rounds = ", ".join(f"{r:.2f}" for r in runs[g])
        print(f"| {g} | {itl:.2f} | {rounds} | {itl / base:.3f} |")


if __name__ == "__main__":
    main()
