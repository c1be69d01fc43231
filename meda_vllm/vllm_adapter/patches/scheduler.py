"""``vllm.v1.core.sched.scheduler.Scheduler``: ``__init__``, ``schedule``, ``update_from_output``.

Why: the scheduler must know which requests are compressed, arm compression on a request's
last prefill chunk, and shrink its block list the moment the worker reports the kept
length, so freed pages are visible to admission and ``vllm:kv_cache_usage_perc`` at once.

How:
- ``__init__``, after the original: per-scheduler state (``scheduler.attach``) and the
  KV manager's overrides (``patches/kv_cache_manager.py``).
- ``schedule``, after the original: lists on ``SchedulerOutput`` (``protocol.ARM_ATTR``)
  the ids of requests whose final prefill chunk runs in this step (``scheduler.arm``;
  the worker resolves each one's settings from its own sampling params).
- ``update_from_output``: before the original, truncates the compressed requests' block
  lists and frees their tail blocks (``scheduler.commit``, reading
  ``ModelRunnerOutput.meda_compressed``); after it, preempts a request whose compaction
  failed half way, with vLLM's own ``_preempt_request``, so it is recomputed uncompressed
  (``scheduler.recompute_failed``), and publishes the blocks each KV cache group holds
  (``scheduler.note_held``, ``meda:group_blocks_held``).

Remove when: vLLM supports shrinking a request's KV natively.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from meda_vllm.vllm_adapter import scheduler as logic
    from meda_vllm.vllm_adapter.patches.kv_cache_manager import install_overrides

    if getattr(Scheduler, "_meda_patched", False):
        return
    orig_init = Scheduler.__init__
    orig_schedule = Scheduler.schedule
    orig_update = Scheduler.update_from_output

    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self._meda = logic.attach(self)
        if self._meda is not None:
            install_overrides(self._meda)
            self.kv_cache_manager._meda = self._meda

    def schedule(self, *args, **kwargs):
        out = orig_schedule(self, *args, **kwargs)
        state = getattr(self, "_meda", None)
        if state is not None:
            logic.arm(self, state, out)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        state = getattr(self, "_meda", None)
        if state is None:
            return orig_update(self, scheduler_output, model_runner_output)
        logic.commit(self, state, model_runner_output)
        state.stepping = True  # frees in this step: published once, below
        try:
            outputs = orig_update(self, scheduler_output, model_runner_output)
        finally:
            state.stepping = False
        if state.recompute:
            logic.recompute_failed(self, state)
        logic.note_held(state)
        return outputs

    Scheduler.__init__ = __init__
    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    Scheduler._meda_patched = True
