"""``build_metadata`` of the ``AttentionGroup`` instances of every KV cache group after the
first, on both runners (installed when compression is set up; with ``kv_layer_groups`` 1
there is no later group and nothing is wrapped).

Why: each KV cache group of a compressed request holds its own physical length
(``kv_layer_groups``), so attention in group ``g`` must see ``seq_lens`` of that length.
vLLM builds every group's attention metadata from one set of ``seq_lens``, which
the runner patch (``patches/v1_runner.py``; on V2 ``patches/model_state.py``) makes physical
for group 0.

How: the wrapper of group ``g``'s ``AttentionGroup.build_metadata`` passes a
``CommonAttentionMetadata.replace(...)`` whose ``seq_lens`` / ``seq_lens_cpu_upper_bound``
(and ``max_seq_len``) are shifted by ``runner._meda_seq_deltas[g]`` (group 0's removed
tokens minus group ``g``'s, set for the step by V1's ``_prepare_inputs`` or V2's
``prepare_attn``). Backends whose
builder reuses group 0's metadata (``supports_update_block_table``) are refused.

Remove when: vLLM supports per-request, per-layer KV lengths natively.
"""

from __future__ import annotations

from typing import Any


def wrap_group_metadata(runner: Any) -> None:
    """Wrap the metadata builds of KV cache groups after the first (no-op for one group)."""
    if getattr(runner, "_meda_groups_wrapped", False):
        return
    runner._meda_groups_wrapped = True
    for group, attn_groups in enumerate(runner.attn_groups):
        if group == 0:
            continue
        for attn_group in attn_groups:
            for builder in attn_group.metadata_builders:
                if getattr(builder, "supports_update_block_table", False):
                    raise RuntimeError(
                        f"meda-vllm: kv_layer_groups > 1 needs an attention backend that "
                        f"builds each group's metadata ({type(builder).__name__} reuses it)"
                    )
            _wrap_build(runner, attn_group, group)


def _wrap_build(runner: Any, attn_group: Any, group: int) -> None:
    orig = attn_group.build_metadata

    def build_metadata(common_attn_metadata, *args, **kwargs):
        deltas = getattr(runner, "_meda_seq_deltas", None)
        delta = deltas.get(group) if deltas else None
        if delta is not None:
            dev, cpu = delta
            cm = common_attn_metadata
            n = cpu.numel()
            seq_lens = cm.seq_lens.clone()
            seq_lens[:n] += dev.to(seq_lens.dtype)
            changes = {"seq_lens": seq_lens}
            if cm.seq_lens_cpu_upper_bound is not None:
                upper = cm.seq_lens_cpu_upper_bound.clone()
                upper[:n] += cpu.to(upper.dtype)
                changes["seq_lens_cpu_upper_bound"] = upper
                changes["max_seq_len"] = max(cm.max_seq_len, int(upper[:n].max()))
            common_attn_metadata = cm.replace(**changes)
        return orig(common_attn_metadata, *args, **kwargs)

    attn_group.build_metadata = build_metadata
