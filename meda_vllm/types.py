"""Plain data passed between the serving engine and the compression core."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerView:
    """What the core sees of one layer of one request after its prefill.

    ``keys``/``values``: ``[H_kv, N, D]``, post-RoPE, any float dtype.
    ``queries``: ``[H, R, D]`` captured query rows (post-RoPE) at prompt positions
    ``query_pos`` (``[R]``, ascending, in ``[0, N)``). They always include the last
    ``min(w, N)`` positions, plus whatever ``compress.required_query_positions`` asked for.
    ``vis``: ``[N]`` bool, True for image/video tokens; None for a text-only request.
    ``scale``: softmax scale, default ``1/sqrt(D)``.

    Optional overrides the engine fills from its fast paged kernels; when present the
    policies use them instead of recomputing:
    ``window_scores``: ``[H_kv, N]`` fp32, sum over the score rows (the last
    ``compress.score_rows(cfg, N)`` prompt queries: ``kv_window`` for every policy but H2O,
    ``min(N, kv_h2o_max_queries)`` for H2O) of the causal softmax, mean over the GQA group,
    before pooling. ``entropy``: MEDA cross-modal entropy of this layer.
    """

    keys: Tensor
    values: Tensor
    queries: Tensor
    query_pos: Tensor
    vis: Tensor | None = None
    scale: float | None = None
    window_scores: Tensor | None = None
    entropy: float | None = None

    def __post_init__(self) -> None:
        if self.keys.dim() != 3 or self.values.shape != self.keys.shape:
            raise ValueError(
                f"keys and values must both be [H_kv, N, D] (got {tuple(self.keys.shape)} and "
                f"{tuple(self.values.shape)})"
            )
        h_kv, n, d = self.keys.shape
        if self.queries.dim() != 3 or self.queries.shape[2] != d:
            raise ValueError(f"queries must be [H, R, {d}] (got {tuple(self.queries.shape)})")
        if self.queries.shape[0] % h_kv != 0:
            raise ValueError(
                f"query heads ({self.queries.shape[0]}) must be a multiple of KV heads ({h_kv})"
            )
        if self.query_pos.dim() != 1 or self.query_pos.numel() != self.queries.shape[1]:
            raise ValueError(
                f"query_pos must be [R] with R={self.queries.shape[1]} "
                f"(got {tuple(self.query_pos.shape)})"
            )
        if self.query_pos.numel() and (
            int(self.query_pos.min()) < 0
            or int(self.query_pos.max()) >= n
            or bool((self.query_pos[1:] <= self.query_pos[:-1]).any())
        ):
            raise ValueError(f"query_pos must be strictly ascending positions in [0, {n})")
        if self.vis is not None and (self.vis.dtype != torch.bool or self.vis.shape != (n,)):
            raise ValueError(f"vis must be a bool tensor of shape [{n}] or None")
        if self.window_scores is not None and self.window_scores.shape != (h_kv, n):
            raise ValueError(
                f"window_scores must be [{h_kv}, {n}] (got {tuple(self.window_scores.shape)})"
            )

    @property
    def N(self) -> int:  # noqa: N802 - the paper's name for the prompt length
        return self.keys.shape[1]

    @property
    def H(self) -> int:  # noqa: N802
        return self.queries.shape[0]

    @property
    def H_kv(self) -> int:  # noqa: N802
        return self.keys.shape[0]

    @property
    def D(self) -> int:  # noqa: N802
        return self.keys.shape[2]

    @property
    def group(self) -> int:
        return self.H // self.H_kv

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.D)


@dataclass
class LayerPlan:
    """What to keep in one layer.

    ``kept``: ``[H_kv, P]`` ascending original positions (same count for every KV head).
    ``keys``/``values``: ``[H_kv, P, D]`` merged entries to write in the kept slots, or
    None when the kept entries are written unchanged. ``budget``: the layer's logical
    budget ``S_l``; ``P >= S_l`` when the plan was padded to a common physical length.
    """

    kept: Tensor
    keys: Tensor | None
    values: Tensor | None
    budget: int

    @property
    def physical_tokens(self) -> int:
        return self.kept.shape[1]


@dataclass
class CompressionPlan:
    """Per-layer plans of one request. ``n_tokens`` is the logical length ``N``."""

    layers: list[LayerPlan]
    n_tokens: int
    policy: str
    fallback: str | None
    entropy: list[float] | None
    layer_budgets: list[int]

    @property
    def kept_tokens(self) -> int:
        """Physical length: the most kept slots over layers."""
        return max((lp.kept.shape[1] for lp in self.layers), default=0)

    @property
    def logical_kept_tokens(self) -> int:
        """Kept tokens summed over layers (per KV head), before any padding."""
        return sum(self.layer_budgets)
