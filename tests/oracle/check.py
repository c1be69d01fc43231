"""Compare what a real `vllm serve` decodes for a request with the reference oracle.

Shared by the production CPU path (tests/e2e/test_oracle.py) and the GPU code path under
the interpreter (tests/gpu_path/test_gpu_path_oracle.py). The server runs with
``MEDA_VLLM_PLAN_DUMP`` so each compressed request leaves its kept positions behind.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from meda_vllm.config import KVPolicyConfig
from tests.e2e.client import client, run_concurrently
from tests.e2e.media import image_part, text_part, video_part
from tests.oracle.reference import Oracle, OracleResult

#: test-only vLLM plugin that breaks the adapter on purpose (see shim/meda_fault_shim.py)
SHIM = Path(__file__).resolve().parent / "shim"

#: The seven policies that evict (``full`` and ``none`` keep everything).
EVICTING = ["snapkv", "pyramidkv", "h2o", "streamingllm", "lookm", "meda", "madakv"]
#: A ratio and an absolute budget (tokens per layer).
BUDGETS = [0.2, 40]
MAX_TOKENS = 16
#: fp32 server and oracle: logprobs agree to ~1e-5; a wrong kept set or position moves
#: them by 1e-3 or more on the sharp test model.
LOGPROB_TOL = 1e-4
#: The sharp test model: 4 layers whose query projections are scaled so each layer
#: attends with a different sharpness (the random model alone attends almost uniformly).
SHARP_Q_SCALES = [4.0, 16.0, 32.0, 64.0]
#: A small observation window, so selection (not the always-kept window) decides most
#: of what a 0.2 budget keeps in these short prompts.
WINDOW = 8

LONG_TEXT = (
    "Tell me a long story about a red cat, a blue dog and a green tree that live in a "
    "small house by the water, where the sun is large and the sky is blue; the cat asks "
    "the dog one question, two questions, three questions, and the dog answers yes or no "
    "to each of them, while the tree listens from the left side of the house and the "
    "person on the right side counts four, five, six, seven, eight, nine and ten."
)


def cases(side: int = 224, video_frames: int = 8, video_size: int = 224) -> dict[str, list]:
    """A text-only, a multi-image and a video request."""
    return {
        "text": [text_part(LONG_TEXT)],
        "images": [image_part(31, side), image_part(32, side), text_part("Compare them.")],
        # noisy frames: the plain clip has identical patches, whose exact similarity ties
        # let fp32 noise pick different merge targets in the server and the oracle
        "video": [video_part(video_frames, video_size, noise=7), text_part("Describe it.")],
    }


@dataclass
class ServerAnswer:
    request_id: str
    tokens: list[int]
    logprobs: list[float]


def ask(srv, content: list[dict], xargs: dict | None, max_tokens: int = MAX_TOKENS):
    """Greedy chat completion with token ids and logprobs; our own request id."""
    c = client(srv)
    rid = uuid.uuid4().hex
    extra = {"request_id": rid, "ignore_eos": True, "return_tokens_as_token_ids": True}
    if xargs:
        extra["vllm_xargs"] = xargs
    r = c.chat.completions.create(
        model=c.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        logprobs=True,
        extra_body=extra,
    )
    steps = r.choices[0].logprobs.content
    tokens = [int(s.token.removeprefix("token_id:")) for s in steps]
    return ServerAnswer(rid, tokens, [s.logprob for s in steps])


def load_dump(dump_dir: Path, request_id: str, timeout: float = 10.0) -> dict | None:
    """The worker's plan record of a request (None: the server did not compress it)."""
    deadline = time.time() + timeout
    while True:
        found = sorted(Path(dump_dir).glob(f"*{request_id}*.pt"))
        if found:
            return torch.load(found[0], weights_only=False)
        if time.time() > deadline:
            return None
        time.sleep(0.1)


def request_config(server: dict, xargs: dict | None) -> KVPolicyConfig:
    return KVPolicyConfig.from_mapping({**server, **(xargs or {})})


def mismatches(answer: ServerAnswer, ref: OracleResult, tol: float = LOGPROB_TOL) -> list[str]:
    """What differs between the server's tokens/logprobs and the oracle's."""
    out = []
    if answer.tokens != ref.tokens:
        out.append(f"tokens differ: server {answer.tokens} oracle {ref.tokens}")
    n = min(len(answer.logprobs), len(ref.logprobs))
    diff = max(
        (abs(a - b) for a, b in zip(answer.logprobs[:n], ref.logprobs[:n], strict=True)), default=0
    )
    if diff > tol:
        out.append(f"logprobs differ by up to {diff:.2e} (tolerance {tol:.0e})")
    return out


def kept_mismatches(dump: dict, ref: OracleResult) -> list[str]:
    """Layers/heads whose kept positions differ between the server's plan and the oracle's."""
    out = []
    if dump["prompt_token_ids"] != ref.prompt_ids:
        out.append("prompt token ids differ between the server and the oracle's processor")
    if dump["layer_budgets"] != ref.plan.layer_budgets:
        out.append(f"layer budgets: server {dump['layer_budgets']} oracle {ref.plan.layer_budgets}")
    for layer, (kept, lp) in enumerate(zip(dump["kept"], ref.plan.layers, strict=True)):
        for head in range(kept.shape[0]):
            a = set(kept[head].tolist())
            b = set(lp.kept[head].tolist())
            if a != b:
                out.append(f"layer {layer} head {head}: server-only {sorted(a - b)[:8]} "
                           f"oracle-only {sorted(b - a)[:8]}")  # fmt: skip
    return out


def verify(answer: ServerAnswer, oracle: Oracle, dump_dir: Path, content, cfg) -> list[str]:
    """Every difference between a compressed request's answer and the oracle's."""
    dump = load_dump(dump_dir, answer.request_id)
    ref = oracle.run(content, cfg, len(answer.tokens))
    if ref.plan is None:
        return ["the oracle did not compress this request (test setup)"]
    if dump is None:
        return ["the server did not compress this request (no plan dump)"]
    problems = kept_mismatches(dump, ref)
    if ref.plan.kept_tokens >= len(ref.prompt_ids):
        problems.append("nothing was evicted")
    return problems + tie_aware_mismatches(answer, oracle, content, cfg, ref)


#: at most this many near-tie merges are resolved both ways (2**k oracle decodes)
MAX_TIES = 4


def tie_aware_mismatches(answer: ServerAnswer, oracle: Oracle, content, cfg, ref) -> list[str]:
    """``mismatches`` against the oracle, where a near-tie merge target (float noise picks
    it: ``reference.TIE_MARGIN``) may go either way: the answer must match one of the
    oracle's decodes over the tied choices."""
    found = mismatches(answer, ref)
    if not found or not ref.ties:
        return found
    if len(ref.ties) > MAX_TIES:
        return [*found, f"{len(ref.ties)} near-tie merge targets (over {MAX_TIES}): {ref.ties}"]
    for choice in range(1, 2 ** len(ref.ties)):
        flipped = frozenset(i for i in range(len(ref.ties)) if choice >> i & 1)
        if not mismatches(answer, oracle.run(content, cfg, len(answer.tokens), flipped)):
            return []
    return [*found, f"(nor with the near-tie merge targets flipped: {ref.ties})"]


def check_compressed(
    srv, oracle: Oracle, dump_dir: Path, content, server: dict, xargs: dict
) -> list[str]:
    """Send one request that must be compressed; every difference from the oracle."""
    answer = ask(srv, content, xargs)
    return verify(answer, oracle, dump_dir, content, request_config(server, xargs))


def shim_pythonpath() -> str:
    return os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p)


def fault_env(logs: Path, dump_dir: Path) -> tuple[dict[str, str], Path]:
    """A server's environment with the plan dump and the fault shim, and the shim's fault
    file (empty: no fault; the test writes the fault's name into it)."""
    fault_file = Path(logs) / "fault"
    fault_file.write_text("")
    env = {
        "MEDA_VLLM_PLAN_DUMP": str(dump_dir),
        "PYTHONPATH": shim_pythonpath(),
        "MEDA_TEST_FAULT_FILE": str(fault_file),
    }
    return env, fault_file


@dataclass
class Job:
    label: str
    policy: str
    content: list[dict]
    xargs: dict


def matrix(policies, budgets, cases: dict[str, list]) -> list[Job]:
    """One request per policy, budget and request kind."""
    return [
        Job(f"{policy} budget {budget} {name}", policy, content,
            {"kv_policy": policy, "kv_budget": budget, "kv_window": WINDOW})
        for policy in policies
        for budget in budgets
        for name, content in cases.items()
    ]  # fmt: skip


def send_all(srv, jobs: list[Job]) -> list[ServerAnswer]:
    """Send every job at once (the server batches them); answers in job order."""
    return run_concurrently([lambda j=j: ask(srv, j.content, j.xargs) for j in jobs])


def verify_all(jobs, answers, oracle: Oracle, dump_dir: Path, server: dict) -> list[str]:
    """The oracle checks of answered jobs (one by one: the oracle is not thread-safe)."""
    problems = []
    for job, answer in zip(jobs, answers, strict=True):
        cfg = request_config(server, job.xargs)
        found = verify(answer, oracle, dump_dir, job.content, cfg)
        problems += [f"{job.label}: {p}" for p in found]
    return problems


def check_matrix(srv, oracle: Oracle, dump_dir: Path, server: dict, policy: str, cases) -> list:
    """Every request kind at every budget of ``BUDGETS`` for one policy."""
    jobs = matrix([policy], BUDGETS, cases)
    return verify_all(jobs, send_all(srv, jobs), oracle, dump_dir, server)
