"""``vllm.v1.core.kv_cache_manager.KVCacheManager.free`` and, per scheduler, four methods
of its full-attention ``SingleTypeKVCacheManager`` instances (one per KV cache group):
``get_num_blocks_to_allocate``, ``allocate_new_blocks``, ``remove_skipped_blocks``,
``cache_blocks``.

Why: the scheduler counts a request's tokens logically (positions, stop checks and
``max_model_len`` never change), while a compressed request holds fewer physical slots;
every token count the manager turns into blocks must be physical. Compacted blocks hold
other tokens than their hashes say, so they must never be published to the prefix cache.
The per-request record must go when the request's blocks are freed.

How:
- ``free`` (class method), after the original: drop the request's record
  (``scheduler.forget``; finish, abort and preemption all free through it) and publish
  the blocks each group still holds (``scheduler.note_held``).
- The four instance methods (installed by ``patches/scheduler.py`` when a scheduler is
  built): the named token counts of a compressed request become ``n - removed`` (the
  manager's own group's) before the block arithmetic; ``cache_blocks`` does nothing
  for a compressed or armed request.

Remove when: vLLM supports shrinking a request's KV natively.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def apply() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    from meda_vllm.vllm_adapter import scheduler as logic

    if getattr(KVCacheManager, "_meda_patched", False):
        return
    orig_free = KVCacheManager.free

    def free(self, request):
        orig_free(self, request)
        state = getattr(self, "_meda", None)
        if state is not None:
            logic.forget(state, request.request_id)
            if not state.stepping:  # an abort between steps; a step publishes at its end
                logic.note_held(state)

    KVCacheManager.free = free
    KVCacheManager._meda_patched = True


def _translating(method: Callable, state: Any, group: int, names: tuple[str, ...]):
    """Wrap group ``group``'s manager method so the named token counts become physical."""
    sig = inspect.signature(method)

    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        removed = state.removed(bound.arguments.get("request_id"), group)
        if removed:
            for name in names:
                if name in bound.arguments and bound.arguments[name]:
                    bound.arguments[name] = max(0, bound.arguments[name] - removed)
        return method(*bound.args, **bound.kwargs)

    wrapper.__wrapped__ = method
    return wrapper


def install_overrides(state: Any) -> None:
    """The instance overrides on ``state.managers`` (one scheduler's full-attention manager
    of each KV cache group; each translates with its own group's kept length)."""
    for group, mgr in enumerate(state.managers):
        _override(state, group, mgr)


def _override(state: Any, group: int, mgr: Any) -> None:
    mgr.get_num_blocks_to_allocate = _translating(
        mgr.get_num_blocks_to_allocate,
        state,
        group,
        (
            "num_tokens",
            "total_computed_tokens",
            "num_local_computed_tokens",
            "num_tokens_main_model",
            "prefill_end",
        ),
    )
    mgr.allocate_new_blocks = _translating(
        mgr.allocate_new_blocks, state, group, ("num_tokens", "num_tokens_main_model")
    )
    mgr.remove_skipped_blocks = _translating(
        mgr.remove_skipped_blocks, state, group, ("processed_computed_tokens",)
    )
    orig_cache_blocks = mgr.cache_blocks

    def cache_blocks(request, *args, **kwargs):
        # Compacted blocks must never be published under the original token hashes.
        if request.request_id in state.records or request.request_id in state.pending:
            return None
        return orig_cache_blocks(request, *args, **kwargs)

    mgr.cache_blocks = cache_blocks
