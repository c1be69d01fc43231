"""``prepare_attn`` of the V2 runner's ``model_state`` (an instance attribute, installed when
compression is set up).

Why: attention must see a compressed request's physical ``seq_lens``, while the runner's
own ``InputBatch`` keeps the logical ones, which the sampler and the draft logic read after
the forward.

How: the wrapper passes ``dataclasses.replace(input_batch, seq_lens=...,
seq_lens_cpu_upper_bound=...)`` with the removed tokens (``runner._meda_offsets``, set by
``patches/v2_runner.py`` for the step) subtracted.

Remove when: vLLM supports shrinking a request's KV natively.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def wrap_model_state(runner: Any) -> None:
    """Physical seq_lens for the attention metadata: the runner's own InputBatch keeps
    logical lengths, which the sampler and the draft logic read after the forward."""
    model_state = runner.model_state
    if getattr(model_state, "_meda_wrapped", False):
        return
    orig = model_state.prepare_attn

    def prepare_attn(input_batch, *args, **kwargs):
        off = getattr(runner, "_meda_offsets", None)
        if off is not None:
            n = off.numel()
            seq_lens = input_batch.seq_lens.clone()
            seq_lens[:n] -= off.to(seq_lens.device, seq_lens.dtype)
            upper = input_batch.seq_lens_cpu_upper_bound.clone()
            upper[:n] -= off.to(upper.dtype)
            input_batch = dataclasses.replace(
                input_batch, seq_lens=seq_lens, seq_lens_cpu_upper_bound=upper
            )
        return orig(input_batch, *args, **kwargs)

    model_state.prepare_attn = prepare_attn
    model_state._meda_wrapped = True
