"""A policy defined in one file (tests/e2e/custom_policy/) with its own knob, registered by
its own vLLM plugin, served with --kv-policy and --kv-policy-config: no other file knows it."""

from __future__ import annotations

import os

import pytest
import torch

from tests.e2e.server import VLLMServer, run_cli
from tests.oracle import check

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLUGIN = os.path.join(os.path.dirname(__file__), "custom_policy")
HEAD = 24  # the policy's own knob, kv_sinkfirst_head (its default is 8)


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (PLUGIN, os.environ.get("PYTHONPATH", "")) if p)


def test_a_policy_in_one_file_is_served_with_its_own_knob(tiny_model_dir, tmp_path):
    dump = tmp_path / "dump"
    flags = [
        "--kv-policy",
        "sinkfirst",
        "--kv-budget",
        "0.2",
        "--kv-window",
        "8",
        "--kv-policy-config",
        f'{{"kv_sinkfirst_head": {HEAD}}}',
    ]
    env = {"PYTHONPATH": _pythonpath(), "MEDA_VLLM_PLAN_DUMP": str(dump)}
    with VLLMServer(tiny_model_dir, flags, tmp_path / "server.log", env=env) as srv:
        answer = check.ask(srv, check.cases()["text"], None, max_tokens=4)
        record = check.load_dump(dump, answer.request_id)
        assert record is not None, "the request was not compressed"
        assert record["cfg"]["kv_policy"] == "sinkfirst"
        assert record["cfg"]["kv_sinkfirst_head"] == HEAD
        n, window = record["n_prompt"], record["cfg"]["kv_window"]
        for layer, kept in enumerate(record["kept"]):
            budget = record["layer_budgets"][layer]
            assert budget > HEAD + window, "the budget must leave room for the knob to show"
            # the first HEAD tokens (the knob), then the most recent ones
            want = torch.cat([torch.arange(HEAD), torch.arange(n - (budget - HEAD), n)])
            for head in kept:
                assert torch.equal(torch.sort(head[:budget]).values.long(), want), layer
        metrics = srv.metrics()
        compressed = [v for k, v in metrics.items() if "requests_compressed_total" in k]
        assert sum(compressed) >= 1, metrics


def test_a_bad_value_of_its_knob_is_refused_at_startup(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", _pythonpath())
    bad = ["--kv-policy", "sinkfirst", "--kv-policy-config", '{"kv_sinkfirst_head": -1}']
    proc = run_cli(["serve", str(tiny_model_dir), *bad])
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "kv_sinkfirst_head must be an integer >= 0 (got -1)" in last, proc.stderr[-2000:]
