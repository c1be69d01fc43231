"""SnapKV: the observation window plus the top tokens by pooled window attention."""

from __future__ import annotations

from dataclasses import dataclass

from meda_vllm.policies.base import Policy


@dataclass(frozen=True)
class SnapKVPolicy(Policy):
    # Everything SnapKV does is the shared default: window scores, pooling, window kept.
    name = "snapkv"
