"""The one entry point: a request's per-layer views in, per-layer kept positions out.

Flow of ``compress``:
1. budgets: ``policy.layer_budgets`` (uniform and PyramidKV read no view; MEDA reads every
   layer once for its entropy; MadaKV reads every layer once, in order, for HCC);
2. selection: every layer is read (again) and ranked, the best ``P_l`` positions kept
   (``P_l = S_l``, or more when padding to a common physical length);
3. merging of the evicted entries into the kept ones, on the final kept set.

With ``layer_set`` (the engine's fast path) steps 2 and 3 run once for all layers: the
set's view stacks every layer's KV heads (``[L * H_kv, ...]``, layer-major), the policy
ranks them with one budget per layer and the paged kernels score and merge all layers in
one launch each, instead of a few dozen small launches per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from meda_vllm.config import KVPolicyConfig
from meda_vllm.merging import merge_evicted
from meda_vllm.policies import Policy
from meda_vllm.selection import rank_positions, take_best, window_scores
from meda_vllm.types import CompressionPlan, LayerPlan, LayerView


def required_query_positions(cfg: KVPolicyConfig, n: int, vis: Tensor | None) -> Tensor:
    """Ascending prompt positions whose query rows the engine must capture in every layer.

    The last ``min(kv_window, n)`` positions; H2O: the last ``min(kv_h2o_max_queries, n)``;
    MEDA: also the entropy sample (``modality.entropy_query_positions``). Empty for
    ``none``/``full`` and when the budget keeps the whole prompt.
    """
    policy = cfg.policy
    if not policy.evicts or cfg.budget_tokens(n) >= n:
        return torch.empty(0, dtype=torch.long)
    return policy.query_positions(n, vis).long()


def compress(
    get_view: Callable[[int], LayerView],
    num_layers: int,
    cfg: KVPolicyConfig,
    n_tokens: int,
    *,
    pad_to: int | Literal["max"] | None = None,
    groups: Sequence[int] | None = None,
    layer_set: Callable[[], LayerView] | None = None,
    chunked: Callable[[int], Sequence[tuple[int, int, Callable[[], LayerView]]]] | None = None,
) -> CompressionPlan | None:
    """Plan the compression of one request's prompt cache; None when nothing is evicted.

    ``get_view(l)`` returns layer ``l``'s view; it may be called twice per layer (budget
    pass, then selection pass). ``pad_to``: ``None`` keeps exactly ``S_l`` per layer;
    ``"max"`` tops every layer up to the largest layer budget; an int ``P`` tops up to
    ``min(P, N)`` and must be at least the largest layer budget. Padding adds the next
    best positions by the layer's own ranking; ``LayerPlan.budget`` stays ``S_l``.

    ``groups``: one group id per layer (the engine's KV cache groups, ``kv_layer_groups``):
    with ``pad_to="max"`` each group's layers are topped up to the group's largest budget
    instead of all layers' (each group holds its own physical length). With more than one
    group, ``layer_set`` and ``chunked`` must be None (they assume one physical length).

    ``layer_set()``: one view of all layers (heads layer-major, ``H_kv = L * H_kv``), used
    for selection and merging when every layer keeps the same physical length (padding)
    and the policy ``takes_layer_sets``; the plan then carries it as
    ``CompressionPlan.layer_set`` and its per-layer plans are views of it. The result
    equals the per-layer plan.

    ``chunked(P)``: instead of one layer set, chunks ``(lo, hi, view of layers lo..hi-1)``
    for physical length ``P`` (a bounded workspace, ``paged_view``). Budgets then come from
    the per-layer views (MEDA's entropies, MadaKV's demands: every layer read once), then
    each chunk is ranked as a layer set and its merge deferred to compaction
    (``CompressionPlan.chunks``, ``LayerPlan.pending``). The plan equals the unchunked one.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 (got {num_layers})")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0 (got {n_tokens})")
    policy = cfg.policy
    n = n_tokens
    budget = cfg.budget_tokens(n)
    if not policy.evicts or budget >= n:
        return None

    def checked_view(layer: int) -> LayerView:
        view = get_view(layer)
        if n != view.N:
            raise ValueError(f"layer {layer} view has {view.N} tokens, expected {n}")
        return view

    if groups is not None:
        if len(groups) != num_layers:
            raise ValueError(f"groups names {len(groups)} layers, expected {num_layers}")
        if len(set(groups)) > 1 and (layer_set is not None or chunked is not None):
            raise ValueError("layer_set and chunked need one physical length (one group)")
    if chunked is not None:
        layer_set = None  # the chunks replace the one layer set
        if not policy.takes_layer_sets:
            chunked = None  # layer by layer
    set_view = None
    if layer_set is not None and policy.takes_layer_sets:
        set_view = layer_set()
        h_kv, set_n, _ = set_view.kv_shape
        if set_n != n or h_kv % num_layers != 0:
            raise ValueError(
                f"layer set view is [{h_kv}, {set_n}, .]: expected N = {n} and KV heads a "
                f"multiple of {num_layers} layers"
            )
    alloc = None
    if set_view is not None:
        alloc = policy.layer_budgets_set(set_view, num_layers, n, budget)
    if alloc is None:
        alloc = policy.layer_budgets(checked_view, num_layers, n, budget)
    budgets = [min(n, b) for b in alloc.budgets]
    if len(budgets) != num_layers:
        raise RuntimeError(f"{policy.name} returned {len(budgets)} budgets for {num_layers}")
    if all(b >= n for b in budgets):
        return None
    physical = _physical_length(pad_to, budgets, n)
    per_layer = [max(physical, b) for b in budgets]
    if groups is not None and pad_to == "max":
        top = {g: max(b for b, h in zip(budgets, groups, strict=True) if h == g) for g in groups}
        per_layer = [top[g] for g in groups]

    set_plan = chunks = None
    if chunked is not None and max(budgets) <= physical < n:
        chunks, layers = [], []
        for lo, hi, get_set in chunked(physical):
            view = get_set()
            part = _plan_layer(policy, view, budgets[lo:hi], physical, defer_merge=True)
            del view
            chunks.append((lo, hi, part))
            layers += [
                LayerPlan(kept=kept, keys=None, values=None, budget=b)
                for kept, b in zip(part.kept.chunk(hi - lo, dim=0), budgets[lo:hi], strict=True)
            ]
    elif set_view is not None and max(budgets) <= physical < n:
        set_plan = _plan_layer(policy, set_view, budgets, physical)
        layers = [
            LayerPlan(kept=kept, keys=keys, values=values, budget=b)
            for kept, keys, values, b in zip(
                *(_split(t, num_layers) for t in (set_plan.kept, set_plan.keys, set_plan.values)),
                budgets,
                strict=True,
            )
        ]
    else:
        layers = []
        for layer in range(num_layers):
            view = checked_view(layer)
            layers.append(_plan_layer(policy, view, budgets[layer], per_layer[layer]))
    return CompressionPlan(
        layers=layers,
        n_tokens=n,
        policy=policy.name,
        fallback=alloc.fallback,
        entropy=alloc.entropy,
        layer_budgets=budgets,
        layer_set=set_plan,
        chunks=chunks,
    )


def _split(t: Tensor | None, num_layers: int) -> list[Tensor | None]:
    return [None] * num_layers if t is None else list(t.chunk(num_layers, dim=0))


def _physical_length(pad_to: int | str | None, budgets: list[int], n: int) -> int:
    if pad_to is None:
        return 0
    if pad_to == "max":
        return max(budgets)
    if isinstance(pad_to, bool) or not isinstance(pad_to, int):
        raise ValueError(f"pad_to must be None, 'max' or an int (got {pad_to!r})")
    physical = min(pad_to, n)
    if physical < max(budgets):
        raise ValueError(f"pad_to={pad_to} is below the largest layer budget {max(budgets)}")
    return physical


def _plan_layer(
    policy: Policy,
    view: LayerView,
    budget: int | list[int],
    physical: int,
    *,
    defer_merge: bool = False,
) -> LayerPlan:
    n = view.N
    device = view.device
    if physical >= n:
        kept = torch.arange(n, device=device).expand(view.H_kv, n).contiguous()
        return LayerPlan(kept=kept, keys=None, values=None, budget=budget)
    ranking = policy.ranking(view, budget)
    order = rank_positions(ranking.score, tiebreak=ranking.tiebreak, tier=ranking.tier)
    kept = take_best(order, physical)
    weights = ranking.attention
    if policy.merge == "weighted" and weights is None:
        weights = window_scores(view, policy.score_rows(n))
    if policy.merge == "none":
        keys = values = None
    elif defer_merge and view.merge is not None:  # merged when compacted (reads the pages)
        w = weights if policy.merge == "weighted" else None
        pending = functools.partial(view.merge, kept, policy.merge, w)
        return LayerPlan(kept=kept, keys=None, values=None, budget=budget, pending=pending)
    elif view.merge is not None:
        keys, values = view.merge(kept, policy.merge, weights)
    else:
        keys, values = merge_evicted(view.keys, view.values, kept, policy.merge, weights)
    return LayerPlan(kept=kept, keys=keys, values=values, budget=budget)
