"""StreamingLLM: the first ``sink`` tokens and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from meda_vllm.policies.base import Policy, TierSpec
from meda_vllm.policies.knobs import integer, knob
from meda_vllm.types import LayerView


@dataclass(frozen=True)
class StreamingLLMPolicy(Policy):
    name = "streamingllm"
    pooled = False

    sink_tokens: int = knob(
        4, integer(0), "first tokens always kept (attention sinks)", setting="kv_sink_tokens"
    )

    def raw_score(self, view: LayerView) -> Tensor:
        # Recency is the score: later positions rank first.
        pos = torch.arange(view.N, dtype=torch.float32, device=view.device)
        return pos.expand(view.H_kv, view.N)

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        # The window comes first; sinks take what is left of the budget.
        window = max(0, min(self.window, budget, n))
        return TierSpec(recent=window, first=min(self.sink_tokens, budget - window))
