"""A compression policy written in one file, as a user would, with a knob of its own.

It keeps the first ``kv_sinkfirst_head`` prompt tokens and then the most recent ones
(a StreamingLLM with its own sink setting). A ``vllm.general_plugins`` entry point (the
dist-info beside this file; the tests put this folder on PYTHONPATH) registers it in
every vLLM process; nothing else in meda-vllm knows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meda_vllm.policies import register_policy
from meda_vllm.policies.base import Policy, TierSpec
from meda_vllm.policies.knobs import integer, knob


@dataclass(frozen=True)
class SinkFirstPolicy(Policy):
    name = "sinkfirst"
    pooled = False

    head: int = knob(8, integer(0), "first prompt tokens always kept")

    def raw_score(self, view):
        pos = torch.arange(view.N, dtype=torch.float32, device=view.device)
        return pos.expand(view.H_kv, view.N)  # later positions rank first

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        window = max(0, min(self.window, budget, n))
        return TierSpec(recent=window, first=min(self.head, budget - window))


def register() -> None:
    register_policy(SinkFirstPolicy, replace=True)
