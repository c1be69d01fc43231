"""One layer of a request, seen by the core straight from a paged KV cache.

The serving engine's bridge between vLLM's pages and :func:`meda_vllm.compress.compress`.
With ``fast=True`` (the Triton kernels; GPU, or forced with ``MEDA_KERNELS=triton``) the
view is lazy: window scores, MEDA's entropy and merging are computed by the paged kernels
on first use, and dense ``[H_kv, N, D]`` copies of K and V are made only if a policy asks
for ``view.keys``/``view.values`` (none does when the kernels provide scores, entropy and
merging). With ``fast=False`` (the CPU production path) K and V are gathered once into
dense tensors and the core computes everything from them with plain torch.

Layer sets (fast path, every layer with one layout): the kernels take all layers' caches
at once (``meda_vllm.kernels.LayerSet``), so window scores and MEDA's entropies are
computed for all layers in one launch each and shared by the per-layer views, and
selection, merging and compaction run once over a view that stacks every layer's heads
(``compress(layer_set=...)``): a constant number of launches per request instead of a
few dozen per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from meda_vllm.compress import compress
from meda_vllm.config import KVPolicyConfig
from meda_vllm.kernels import (
    PagedKVLayout,
    compact_,
    dispatch,
    gather_kv,
    paged_merge,
    paged_scores_and_entropy,
    paged_window_scores,
)
from meda_vllm.kernels.layout import same_geometry
from meda_vllm.merging import merge_weights
from meda_vllm.selection import rows_for_positions
from meda_vllm.types import CompressionPlan, LayerView, check_query_positions
from meda_vllm.workspace import WorkspaceTooSmall, layer_cost

Caches = Tensor | Sequence[Tensor]


def paged_layer_view(
    cache: Caches,
    layout: PagedKVLayout,
    row: Tensor,
    n: int,
    queries: Tensor,
    query_pos: Tensor,
    vis: Tensor | None,
    *,
    fast: bool,
    score_sel: Tensor | None = None,
    entropy_sel: Tensor | None = None,
    entropy_causal: bool = False,
    scores: Callable[[], Tensor] | None = None,
    entropy: Callable[[], Tensor] | None = None,
) -> LayerView:
    """The :class:`LayerView` of one layer whose first ``n`` tokens live in pages ``row``
    (or, fast path, of a layer set: ``cache`` a sequence of ``L`` layer caches, heads
    layer-major, ``queries [L * H, R, D]``).

    ``queries [H, R, D]`` captured rows at ``query_pos [R]``. Fast path only:
    ``score_sel`` indexes the rows the window scores sum over (``Policy.score_rows``);
    ``entropy_sel`` the rows of MEDA's entropy sample (None: no entropy override);
    ``scores``/``entropy``: callables that provide them instead (shared computations).
    """
    if not fast:
        keys, values = gather_kv(cache, layout, row, n, backend="torch")
        return LayerView(keys=keys, values=values, queries=queries, query_pos=query_pos, vis=vis)
    heads = layout.num_kv_heads * (1 if isinstance(cache, Tensor) else len(cache))

    @functools.cache
    def dense() -> tuple[Tensor, Tensor]:
        return gather_kv(cache, layout, row, n)

    def win_sel() -> Tensor:  # the rows the window scores sum over
        sel = score_sel if score_sel is not None else torch.arange(queries.shape[1])
        return sel.to(query_pos.device)

    def window_scores() -> Tensor:
        sel = win_sel()
        return paged_window_scores(queries[:, sel], query_pos[sel], cache, layout, row, n)

    if entropy is None and entropy_sel is not None and vis is not None:
        # MEDA: scores and entropy from one read of K (their first passes share a launch)

        @functools.cache
        def scores_and_entropy() -> tuple[Tensor, Tensor]:
            window = win_sel()
            sel = torch.cat([window, entropy_sel.to(query_pos.device)])
            s, e = paged_scores_and_entropy(
                queries[:, sel], query_pos[sel], window.numel(), cache, layout, row, n,
                vis, causal=entropy_causal,
            )  # fmt: skip
            return s, e.sum(-1)  # entropy: 0-d, or [L] for a layer set (one host copy)

        if scores is None:
            scores = lambda: scores_and_entropy()[0]  # noqa: E731
        entropy = lambda: scores_and_entropy()[1]  # noqa: E731

    def merge(kept: Tensor, mode: str, weights: Tensor | None):
        w = merge_weights(weights) if mode == "weighted" else None
        return paged_merge(cache, layout, row, n, kept.contiguous(), mode, w)

    return LayerView(
        keys=lambda: dense()[0],
        values=lambda: dense()[1],
        queries=queries,
        query_pos=query_pos,
        vis=vis,
        window_scores=scores or window_scores,
        entropy=entropy if vis is not None else None,
        shape=(heads, n, layout.head_size),
        merge=merge,
    )


def plan_paged_request(
    caches: Sequence[Tensor],
    layouts: Sequence[PagedKVLayout],
    row: Tensor | Sequence[Tensor],
    n: int,
    query_rows: Callable[[int], Tensor],
    query_pos: Tensor,
    vis: Tensor | None,
    cfg: KVPolicyConfig,
    *,
    fast: bool,
    layer_sets: bool = True,
    workspace: int | None = None,
    groups: Sequence[int] | None = None,
) -> CompressionPlan | None:
    """Plan one request's compression straight from its pages (what the worker runs).

    ``caches[l]``/``layouts[l]``: layer ``l``'s cache tensor and layout; ``row``: the
    request's block-table row (covering ``n`` tokens); ``query_rows(l)``: layer ``l``'s
    captured query rows ``[H, R, D]`` at ``query_pos [R]``
    (``compress.required_query_positions``). One physical length for all layers
    (``pad_to="max"``, phase 1 of docs/INTEGRATION.md). None: nothing to evict.
    ``layer_sets``: on the fast path, treat all layers as one set when they share a
    layout (the default; False plans layer by layer, the same plan with more launches).

    ``groups``: the KV cache group of each layer (``kv_layer_groups`` > 1); ``row`` is then
    one block-table row per layer (its group's), and each group keeps its own physical
    length, the largest budget of its layers (``compress(groups=...)``), planned layer by
    layer. None or one group: one row, one physical length.

    ``workspace``: bytes the plan and compaction may allocate (``kv_workspace_bytes``;
    None: unbounded). The layer set is then processed in chunks of as many layers as fit
    (``workspace.layer_cost``): the same plan, with its merges deferred to ``apply_plan``
    so that one chunk's merged K/V exist at a time. ``WorkspaceTooSmall`` when not even one
    layer fits (raised before any page is written).
    """
    # Row selections from one host copy of the positions (checked once here, not in every
    # layer's view): on a GPU each would otherwise synchronise.
    num_layers = len(caches)
    rows = list(row) if not isinstance(row, Tensor) else [row] * num_layers
    if len(rows) != num_layers:
        raise ValueError(f"{len(rows)} block-table rows for {num_layers} layers")
    grouped = groups is not None and len(set(groups)) > 1
    row = rows[0]
    pos = query_pos.cpu()
    check_query_positions(pos, n)
    policy = cfg.policy
    score_sel = torch.nonzero(pos >= n - policy.score_rows(n)).squeeze(1).to(query_pos.device)
    entropy_sel = None
    wanted = policy.entropy_positions(n, vis) if fast and vis is not None else None
    if wanted is not None:
        entropy_sel = rows_for_positions(pos, wanted).to(query_pos.device)
    common = {"fast": fast, "entropy_causal": policy.entropy_causal}
    as_layer_set = fast and layer_sets and not grouped and _one_layout(caches, layouts)
    if as_layer_set:
        layout, heads = layouts[0], layouts[0].num_kv_heads

        @functools.cache
        def set_queries() -> Tensor:  # [L * H, R, D], layer-major
            return torch.cat([query_rows(layer) for layer in range(num_layers)])

        @functools.cache
        def set_view() -> LayerView:  # entropy: [L], window scores: [L * H_kv, N]
            return paged_layer_view(
                list(caches), layout, row, n, set_queries(), query_pos, vis,
                score_sel=score_sel, entropy_sel=entropy_sel, **common,
            )  # fmt: skip

    def get_view(layer: int) -> LayerView:
        overrides = {}
        if as_layer_set:
            lo = layer * heads
            overrides["scores"] = lambda: set_view().window_scores[lo : lo + heads]
            if entropy_sel is not None and vis is not None:
                overrides["entropy"] = lambda: set_view().entropy[layer]
        return paged_layer_view(
            caches[layer], layouts[layer], rows[layer], n, query_rows(layer), query_pos, vis,
            score_sel=score_sel, entropy_sel=entropy_sel, **common, **overrides,
        )  # fmt: skip

    layer_set = set_view if as_layer_set else None
    if workspace is None:
        return compress(
            get_view, num_layers, cfg, n, pad_to="max", groups=groups, layer_set=layer_set
        )

    first = query_rows(0)
    geometry = {
        "heads": first.shape[0],
        "kv_heads": layouts[0].num_kv_heads,
        "head_size": layouts[0].head_size,
        "dtype": caches[0].dtype,
        "merge": policy.merge,
        "score_rows": int(score_sel.numel()),
        "entropy_rows": 0 if entropy_sel is None else int(entropy_sel.numel()),
        "query_rows": int(query_pos.numel()),
        "query_dtype": first.dtype,
        "fast": fast,
        "num_sms": dispatch.num_sms(caches[0].device),
    }

    def fitting(p: int, *, deferred: bool, strict: bool = True) -> int:
        cost = layer_cost(n, p, merged_retained=not deferred, **geometry)
        count = cost.layers_per_chunk(num_layers, workspace)
        if count < 1 and strict:
            need = cost.chunk_bytes(num_layers, 1)
            raise WorkspaceTooSmall(
                f"one layer of this request (N = {n}, P = {p}) needs {need} bytes, "
                f"kv_workspace_bytes is {workspace}"
            )
        return count

    if not as_layer_set:  # layer by layer (the torch path, mixed layouts): every layer's plan
        fitting(max(0, n - 1), deferred=False)  # is held until compaction
        return compress(get_view, num_layers, cfg, n, pad_to="max", groups=groups)
    if fitting(max(0, n - 1), deferred=True, strict=False) >= num_layers:
        return compress(get_view, num_layers, cfg, n, pad_to="max", layer_set=layer_set)

    # Chunks: budgets from per-layer views fed by chunk views (one alive at a time), then
    # selection, merging and compaction chunk by chunk.
    current: dict[tuple[int, int], LayerView] = {}

    def chunk_view(lo: int, hi: int) -> LayerView:
        if (lo, hi) not in current:
            current.clear()
            rows = torch.cat([query_rows(layer) for layer in range(lo, hi)])
            current[(lo, hi)] = paged_layer_view(
                list(caches[lo:hi]), layout, row, n, rows, query_pos, vis,
                score_sel=score_sel, entropy_sel=entropy_sel, **common,
            )  # fmt: skip
        return current[(lo, hi)]

    budget_chunk = fitting(0, deferred=True)

    def get_chunked_view(layer: int) -> LayerView:
        lo = layer - layer % budget_chunk
        hi = min(num_layers, lo + budget_chunk)
        at = (layer - lo) * heads
        overrides = {"scores": lambda: chunk_view(lo, hi).window_scores[at : at + heads]}
        if entropy_sel is not None and vis is not None:
            overrides["entropy"] = lambda: chunk_view(lo, hi).entropy[layer - lo]
        return paged_layer_view(
            caches[layer], layouts[layer], row, n, query_rows(layer), query_pos, vis,
            score_sel=score_sel, entropy_sel=entropy_sel, **common, **overrides,
        )  # fmt: skip

    def chunks(p: int) -> list[tuple[int, int, Callable[[], LayerView]]]:
        size = fitting(p, deferred=True)
        spans = [(lo, min(num_layers, lo + size)) for lo in range(0, num_layers, size)]
        return [(lo, hi, functools.partial(chunk_view, lo, hi)) for lo, hi in spans]

    return compress(get_chunked_view, num_layers, cfg, n, pad_to="max", chunked=chunks)


def _one_layout(caches: Sequence[Tensor], layouts: Sequence[PagedKVLayout]) -> bool:
    """Whether every layer's cache can join one ``LayerSet`` (one layout, dtype, shape)."""
    return all(lay == layouts[0] for lay in layouts) and all(
        same_geometry(c, caches[0]) for c in caches
    )


def apply_plan(
    caches: Sequence[Tensor],
    layouts: Sequence[PagedKVLayout],
    row: Tensor | Sequence[Tensor],
    plan: CompressionPlan,
) -> None:
    """Compact every layer in place: its kept (or merged) tokens move to slots ``[0, P)``
    (a plan made from a layer set: all layers in one launch). ``row``: one block-table row,
    or one per layer (KV cache groups, ``plan_paged_request(groups=...)``)."""
    rows = list(row) if not isinstance(row, Tensor) else [row] * len(caches)
    row = rows[0]
    if all(lp.keys is None and lp.physical_tokens >= plan.n_tokens for lp in plan.layers):
        return  # every layer keeps all N tokens in place (a layer's budget reached N)
    if plan.chunks is not None:  # one chunk's merged K/V at a time
        for lo, hi, part in plan.chunks:
            keys, values = part.merged()  # reads this chunk's pages before they move
            compact_(list(caches[lo:hi]), layouts[lo], row, part.kept, keys, values)
            del keys, values
        return
    if plan.layer_set is not None:
        st = plan.layer_set
        compact_(list(caches), layouts[0], row, st.kept, st.keys, st.values)
        return
    for layer, lp in enumerate(plan.layers):
        compact_(caches[layer], layouts[layer], rows[layer], lp.kept, lp.keys, lp.values)
