"""What every policy shares: window scores, pooling, forced-keep tiers, uniform budgets.

A policy is a frozen dataclass built from the request's settings (``KVPolicyConfig``);
its own settings are fields declared with ``knobs.knob`` (name, default, range, help).
It says how to score positions (``raw_score``, pooled into ``score``), which positions
are forced (``tiers``: higher tiers are kept first, whatever their score) and, optionally,
how to split the budget over layers (``layer_budgets``). Ranking, padding and merging live in
``compress.py``, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from meda_vllm.budgets import LayerBudgets, uniform_budgets
from meda_vllm.policies.knobs import knobs_of
from meda_vllm.selection import pool_scores, tier_rows, window_scores
from meda_vllm.types import LayerView

GetView = Callable[[int], LayerView]


@dataclass(frozen=True)
class Ranking:
    """How one layer orders its positions (see ``selection.rank_positions``).

    ``score``/``tiebreak``: ``[H_kv, N]``; ``tier``: ``[N]`` or ``[H_kv, N]`` ints or None;
    ``attention``: the raw window column sums when the policy computed them (reused as
    merge weights).
    """

    score: Tensor
    tiebreak: Tensor | None = None
    tier: Tensor | None = None
    attention: Tensor | None = None


@dataclass(frozen=True)
class TierSpec:
    """One layer's forced-keep tiers as counts (host ints): the last ``recent`` positions
    rank first (tier 2); then (tier 1) the first ``first`` positions and, with
    ``text_first``, the text positions; everything else is tier 0 (``selection.tier_rows``)."""

    recent: int
    first: int = 0
    text_first: bool = False


@dataclass(frozen=True)
class Policy:
    name: ClassVar[str] = ""
    default_merge: ClassVar[str] = "none"
    evicts: ClassVar[bool] = True
    # Whether kv_pooling applies; H2O, LOOK-M and StreamingLLM rank unpooled scores.
    pooled: ClassVar[bool] = True
    # Whether ``ranking`` accepts a layer set: a view of several layers' heads stacked
    # (``[L * H_kv, N]``) with one budget per layer, ranked in one pass (the engine's fast
    # path, ``compress(layer_set=...)``). A policy whose ``ranking`` cannot says False.
    takes_layer_sets: ClassVar[bool] = True
    # Whether the cross-modal entropy (``entropy_positions``) uses a causal mask; a
    # policy that budgets layers by entropy makes it a knob (MEDA).
    entropy_causal: ClassVar[bool] = False

    window: int = 32
    pooling: str = "max"
    pool_kernel: int = 7
    merge: str = "none"
    min_keep: int = 16

    @classmethod
    def from_config(cls, cfg: Any) -> Policy:
        """Built from a ``KVPolicyConfig``: the shared settings, then the policy's knobs."""
        return cls(
            window=cfg.kv_window,
            pooling=cfg.kv_pooling if cls.pooled else "none",
            pool_kernel=cfg.kv_pool_kernel,
            merge=cfg.kv_merge or cls.default_merge,
            min_keep=cfg.kv_min_tokens_per_layer,
            **{k.field: getattr(cfg, k.setting) for k in knobs_of(cls)},
        )

    @classmethod
    def check_settings(cls, values: dict[str, Any]) -> None:
        """Checks across this policy's knobs (``values``: every setting by name); raise
        ValueError with one line. Default: none."""

    # --- what the engine must capture ---------------------------------------------------

    def score_rows(self, n: int) -> int:
        """How many of the last prompt queries the window scores sum over."""
        return min(self.window, n)

    def query_positions(self, n: int, vis: Tensor | None) -> Tensor:
        """Ascending prompt positions whose query rows this policy reads."""
        return torch.arange(n - max(self.score_rows(n), min(self.window, n)), n)

    def max_query_rows(self, n: int) -> int:
        """The most rows ``query_positions`` returns for any ``n``-token prompt (what the
        engine sizes its query capture and compression workspace for)."""
        return max(self.score_rows(n), min(self.window, n))

    def entropy_positions(self, n: int, vis: Tensor | None) -> Tensor | None:
        """Prompt positions of the sampled cross-modal entropy rows, for a policy that
        budgets layers by it (the paged kernels then compute it with the window scores);
        None: no entropy."""
        return None

    # --- scoring ------------------------------------------------------------------------

    def raw_score(self, view: LayerView) -> Tensor:
        """``[H_kv, N]`` fp32 importance before pooling (default: window column sums)."""
        return window_scores(view, self.score_rows(view.N))

    def score(self, view: LayerView) -> Tensor:
        """``[H_kv, N]`` fp32 importance used for ranking."""
        return pool_scores(self.raw_score(view), self.pooling, self.pool_kernel)

    def tier_spec(self, n: int, budget: int) -> TierSpec:
        """Forced-keep tiers of a layer with budget ``budget`` (default: the window)."""
        return TierSpec(recent=min(self.window, budget))

    def tiers(self, view: LayerView, budget: int | Sequence[int]) -> Tensor | None:
        """``[N]`` int64 tiers for one budget; for a layer set (one budget per layer, the
        view's heads layer-major) ``[H_kv, N]``, each head with its layer's tiers."""
        if isinstance(budget, int):
            return tier_rows(view.N, [self.tier_spec(view.N, budget)], view.vis, view.device)[0]
        specs = [self.tier_spec(view.N, b) for b in budget]
        if len(set(specs)) == 1:  # uniform budgets: one row serves every head
            return tier_rows(view.N, specs[:1], view.vis, view.device)[0]
        rows = tier_rows(view.N, specs, view.vis, view.device)  # [L, N]
        return rows.repeat_interleave(view.H_kv // len(specs), dim=0)

    def ranking(self, view: LayerView, budget: int | Sequence[int]) -> Ranking:
        raw = self.raw_score(view)
        return Ranking(
            score=pool_scores(raw, self.pooling, self.pool_kernel),
            tiebreak=raw,
            tier=self.tiers(view, budget),
            attention=raw,
        )

    # --- budgets ------------------------------------------------------------------------

    def layer_budgets(
        self, get_view: GetView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets:
        """Per-layer budgets averaging ``budget`` (default: uniform; reads no view)."""
        return LayerBudgets(uniform_budgets(num_layers, budget))

    def layer_budgets_set(
        self, view: LayerView, num_layers: int, n: int, budget: int
    ) -> LayerBudgets | None:
        """``layer_budgets`` from a layer set's view (all layers' heads, layer-major) when
        that is cheaper than layer by layer, else None (the default: use ``layer_budgets``).
        Must give exactly what ``layer_budgets`` gives."""
        return None
