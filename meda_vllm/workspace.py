"""How much memory the compression of one request needs, per layer: the estimator behind
``kv_workspace_bytes`` (layer chunking in ``paged_view``, the reservation at engine start).

One request's compression allocates, per layer of the layer set being processed:

* fast path (Triton kernels over the pages, ``paged_view.plan_paged_request(fast=True)``):

  - the stacked query rows (``torch.cat`` of every layer's captured rows) and their
    row selection for the score/entropy launch: ``2 * H * R * D`` in the query dtype;
  - the split-K statistics ``m, z, t`` (``kernels/split_stats.py: split_stats``):
    ``3 * H_kv * splits * group * R`` fp32, and ``lse`` (``window_scores.finish_scores``);
  - the window scores ``[H_kv, N]`` fp32 (``window_scores.finish_scores``);
  - the ranking (``selection.rank_positions``, pooling, tiers; MadaKV's quotas): a few
    ``[H_kv, N]`` fp32 / int64 / bool tensors alive at once, ``RANK_BYTES`` per (head, token);
  - the kept positions ``[H_kv, P]`` int64 and ``take_best``'s int32 sort;
  - merging (``kernels/merge.py: _launch``): the kept K and V ``[H_kv, P, D]`` (cache
    dtype), their fp32 norms' temporaries, the merged outputs (cache dtype), the evicted
    positions and their sort, the match and segment arrays;
  - compaction (``kernels/compact.py: compact_``): without merging, the staged gather of
    the kept K and V, ``2 * H_kv * P * D`` in the cache dtype (with merging the merged
    outputs are written as they are).

* torch path (the CPU production path, one layer at a time): the dense ``gather_kv``
  copy ``2 * H_kv * N * D``, the chunked logits of ``selection.attention_column_sums``
  and ``entropy.cross_modal_entropy`` (at most ``2**24`` elements at once), the fp32 copies
  of ``merging.merge_evicted``, the staged gather of ``compact_reference_``.

The estimate is the *sum* of these stages (each stage's peak; they do not all coexist), so
it is an upper bound of the peak (tests/kernels/test_kernel_workspace.py measures the
tensors the kernels and the core create). It splits into bytes that stay alive until the
request's last layer is compacted (``retained``: the kept positions, the weights of a
deferred weighted merge) and bytes of the layers being processed (``transient``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: bytes per (KV head, token) that ranking keeps alive at once (scores, pooled scores,
#: tiebreak, tiers, the sort's values and int64 indices, MadaKV's masks and quotas)
RANK_BYTES = 96
#: bytes per (KV head, token) of the merge's position bookkeeping (kept mask, argsort of
#: the evicted positions, match, segment sort, weights)
MERGE_POS_BYTES = 56
#: the torch path's chunked logits (``selection._MAX_ELEMS``, ``merging._MAX_ELEMS``)
TORCH_CHUNK_ELEMS = 1 << 24


@dataclass(frozen=True)
class LayerCost:
    """Bytes one layer of one request needs while it is compressed."""

    retained: int  # alive until the request's last chunk is compacted
    transient: int  # alive while this layer's chunk is planned, merged, compacted

    def chunk_bytes(self, num_layers: int, chunk: int) -> int:
        """Peak bytes when ``num_layers`` layers are processed ``chunk`` at a time."""
        return num_layers * self.retained + min(chunk, num_layers) * self.transient

    def layers_per_chunk(self, num_layers: int, workspace: int) -> int:
        """The most layers processed at once within ``workspace`` bytes (0: not one)."""
        room = workspace - num_layers * self.retained
        if room < self.transient:
            return 0
        return min(num_layers, room // max(1, self.transient))


def layer_cost(
    n: int,
    p: int,
    *,
    heads: int,
    kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    merge: str = "none",
    score_rows: int,
    entropy_rows: int = 0,
    query_rows: int | None = None,
    query_dtype: torch.dtype | None = None,
    fast: bool = True,
    num_sms: int = 1,
    merged_retained: bool = False,
) -> LayerCost:
    """The per-layer cost of compressing a prompt of ``n`` tokens to ``p <= n`` slots.

    ``heads``/``kv_heads``/``head_size``: H, H_kv, D; ``dtype``: the KV cache dtype;
    ``merge``: the policy's merge mode (``none``, ``average``, ``weighted``);
    ``score_rows``/``entropy_rows``: the captured rows the window scores and MEDA's entropy
    read; ``query_rows``: all captured rows (default their sum); ``num_sms``: the device's
    multiprocessors (the split-K kernels' splits), 1 on CPU; ``merged_retained``: the
    plan holds every layer's merged K/V until compaction (layer-by-layer plans and the
    torch path; layer chunks defer their merges instead).
    """
    if not 0 <= p <= n:
        raise ValueError(f"need 0 <= P <= N (got P = {p}, N = {n})")
    h, d = kv_heads, head_size
    group = max(1, heads // max(1, kv_heads))
    cb = torch.empty((), dtype=dtype).element_size()
    qb = torch.empty((), dtype=query_dtype or dtype).element_size()
    rows = score_rows + entropy_rows
    r_all = max(rows, query_rows if query_rows is not None else rows)
    merging = merge != "none"
    kv_p = 2 * h * p * d * cb  # K and V of the kept slots in the cache dtype
    evicted = n - p
    retained = 8 * h * p + (4 * h * n if merge == "weighted" else 0)
    if merging and (merged_retained or not fast):
        retained += kv_p
    select = RANK_BYTES * h * n + 24 * h * p
    if fast:
        splits = min(max(1, math.ceil(n / 16)), max(2, math.ceil(2 * num_sms / max(1, h))))
        queries = 2 * heads * r_all * d * qb
        stats = 3 * h * splits * group * rows * 4 + h * group * score_rows * 4
        scores = 4 * h * n
        merge_bytes = 0
        if merging:
            merge_bytes = 2 * kv_p + 2 * h * p * d * 4 + MERGE_POS_BYTES * h * n + 24 * h * evicted
        compact = 0 if merging else kv_p
        transient = queries + stats + scores + select + merge_bytes + compact
    else:
        dense = 2 * h * n * d * cb
        chunk = TORCH_CHUNK_ELEMS
        # chunked logits, fp32 copies of K (all heads) and of the selected query rows
        logits = 3 * 4 * min(chunk, group * max(1, rows) * n) + 4 * h * n * d + 4 * h * n
        logits += 2 * heads * r_all * d * (qb + 4)
        merge_bytes = 0
        if merging:
            # merge_evicted: fp32 copies of K or V, accumulators, the chunked similarities
            merge_bytes = (
                2 * 4 * h * n * d
                + 2 * 4 * h * p * d
                + 4 * h * evicted * d
                + 2 * 4 * min(chunk, max(1, evicted) * max(1, p))
                + MERGE_POS_BYTES * h * n
            )
        compact = kv_p + 8 * h * p * 3
        transient = dense + logits + select + merge_bytes + compact
    return LayerCost(retained=int(retained), transient=int(transient))


def auto_workspace_bytes(
    max_model_len: int,
    *,
    heads: int,
    kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    max_query_rows: int,
    num_layers: int,
    fast: bool = True,
    num_sms: int = 1,
) -> int:
    """``kv_workspace_bytes = 0``: enough for every request the server admits, one layer at
    a time: a prompt of ``max_model_len`` tokens kept at ``P = N - 1`` slots with weighted
    merging (the most any policy needs per layer), ``max_query_rows`` captured rows, plus
    the retained bytes of all ``num_layers`` layers. Shorter requests fit several layers
    per chunk (most fit all of them)."""
    n = max(1, max_model_len)
    cost = layer_cost(
        n,
        max(0, n - 1),
        heads=heads,
        kv_heads=kv_heads,
        head_size=head_size,
        dtype=dtype,
        merge="weighted",
        score_rows=min(n, max_query_rows),
        entropy_rows=0,
        query_rows=max_query_rows,
        fast=fast,
        num_sms=num_sms,
        merged_retained=not fast,
    )
    return max(1 << 20, cost.chunk_bytes(num_layers, 1))


class WorkspaceTooSmall(RuntimeError):
    """Not even one layer of this request fits ``kv_workspace_bytes``: it is served
    uncompressed (skipped, reason ``workspace``)."""
