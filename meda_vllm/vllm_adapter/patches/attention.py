"""``impl.forward`` of every decoder attention layer (instance attributes, installed when
compression is set up; any backend: CPU_ATTN, TRITON_ATTN, FLASH_ATTN, ...).

Why: scoring needs the prompt's post-RoPE query rows (the observation window, MEDA's
sampled visual rows), which exist only inside the attention call; the paged cache holds
only keys and values.

How: the wrapper copies the rows the step's ``capture.CaptureStep`` asks for into the
request's capture buffer, then calls the original.

Remove when: vLLM exposes a query-observer hook on attention layers.
"""

from __future__ import annotations

from meda_vllm.vllm_adapter import capture
from meda_vllm.vllm_adapter.log import logger


def wrap_attention_layers(layers: dict[str, object], layer_index: dict[str, int]) -> int:
    """Wrap ``impl.forward`` of the given attention layers; returns how many were wrapped."""
    wrapped = 0
    for name, layer in layers.items():
        impl = getattr(layer, "impl", None)
        if impl is None or getattr(impl, "_meda_wrapped", False):
            continue
        index = layer_index[name]
        head_size = layer.head_size
        orig_forward = impl.forward

        def forward(
            layer_,
            query,
            key,
            value,
            kv_cache,
            attn_metadata,
            *args,
            _o=orig_forward,
            _i=index,
            _h=head_size,
            **kwargs,
        ):
            step = capture.current_step()
            if step is not None and attn_metadata is not None:
                step.take(_i, query, _h)
            return _o(layer_, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

        impl.forward = forward
        impl._meda_wrapped = True
        wrapped += 1
    logger.debug("meda-vllm: capturing query rows in %d attention layers", wrapped)
    return wrapped
