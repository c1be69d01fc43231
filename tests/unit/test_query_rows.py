"""``Policy.max_query_rows(n)`` bounds the query rows every policy reads (the engine sizes
its query capture and compression workspace with it, ``vllm_adapter.memory``)."""

from __future__ import annotations

import pytest
import torch

from meda_vllm.config import KVPolicyConfig
from meda_vllm.policies import policy_names


def _masks(n: int, gen: torch.Generator):
    yield None
    yield torch.ones(n, dtype=torch.bool)
    yield torch.zeros(n, dtype=torch.bool)
    tail = torch.zeros(n, dtype=torch.bool)
    tail[n // 3 :] = True  # the window holds no text: text rows stand in from before it
    yield tail
    for _ in range(4):
        yield torch.rand(n, generator=gen) < torch.rand(1, generator=gen)


@pytest.mark.parametrize("policy", policy_names())
@pytest.mark.parametrize(
    "knobs", [{}, {"kv_window": 8, "kv_meda_visual_rows": 0}, {"kv_h2o_max_queries": 64}]
)
def test_no_prompt_reads_more_query_rows_than_the_bound(policy, knobs):
    cfg = KVPolicyConfig.from_mapping({"kv_policy": policy, "kv_budget": 0.2, **knobs})
    gen = torch.Generator().manual_seed(0)
    worst = 0
    for n in (1, 7, 40, 333, 2000):
        bound = cfg.policy.max_query_rows(n)
        assert bound <= n
        for vis in _masks(n, gen):
            rows = cfg.policy.query_positions(n, vis).numel()
            assert rows <= bound, (n, rows, bound)
            worst = max(worst, rows / max(bound, 1))
    if cfg.policy.evicts:
        assert worst > 0.5  # the bound is not far above what is read
