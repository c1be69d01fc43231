"""Triton kernels that compress a request's KV cache directly over vLLM's paged blocks.

Installed as ``meda_vllm.kernels`` (the top-level ``kernels/`` folder). Every op validates
its inputs (``ValueError``), runs a Triton kernel on CUDA tensors and plain torch
elsewhere: for scores, entropy and merging the core's own function (``meda_vllm.selection``,
``.entropy``, ``.merging``) on K and V gathered from the pages, so each op has one torch
reference. ``backend="triton"|"torch"|"auto"`` or ``$MEDA_KERNELS`` overrides the choice
(see :mod:`.dispatch`). The layout of a cache is a :class:`PagedKVLayout`.
See docs/KERNELS.md.
"""

from .compact import compact_, compact_reference_
from .dispatch import resolve_backend
from .entropy import paged_cross_modal_entropy, paged_scores_and_entropy
from .gather import gather_kv, gather_kv_at, gather_kv_at_reference, gather_kv_reference
from .layout import PagedKVLayout
from .match import merge_match
from .merge import paged_merge
from .window_scores import paged_window_scores

__all__ = [
    "PagedKVLayout",
    "compact_",
    "compact_reference_",
    "gather_kv",
    "gather_kv_at",
    "gather_kv_at_reference",
    "gather_kv_reference",
    "merge_match",
    "paged_cross_modal_entropy",
    "paged_merge",
    "paged_scores_and_entropy",
    "paged_window_scores",
    "resolve_backend",
]
