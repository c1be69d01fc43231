"""``vllm.v1.core.kv_cache_utils.get_kv_cache_groups``.

Why: vLLM puts all full-attention layers of a model in one KV cache group, so a request
has one block table and one length for every layer, and a layer that keeps fewer tokens
than another still holds as many pages. Per-layer budgets (PyramidKV, MEDA, MadaKV) free
memory only if layers can hold different lengths: with ``kv_layer_groups = G > 1`` the
layers are split into ``G`` groups of consecutive layers, each with its own block table
over the one shared block pool (vLLM's hybrid allocator, as for sliding-window models),
and a compressed request's groups keep different numbers of blocks.

How: after the original, a single full-attention group of ``L`` layers becomes ``G``
groups of ``L / G`` consecutive layers (by layer index) with the same spec. vLLM then
sizes each block as ``L / G`` layers' pages (``get_kv_cache_config_from_groups``) and the
groups share the pool; the scheduler and the runners treat each group separately
(``scheduler.py``, ``patches/v1_runner.py``). ``G`` must divide ``L`` (one line at
engine start otherwise). Other models (several groups already) are left as they are and
refused where compression is attached.

Remove when: vLLM supports per-request, per-layer KV lengths natively.
"""

from __future__ import annotations


def split_layers(layer_names: list[str], num_groups: int) -> list[list[str]]:
    """``layer_names`` (any order) as ``num_groups`` runs of consecutive layer indices."""
    from vllm.model_executor.models.utils import extract_layer_index

    names = sorted(layer_names, key=extract_layer_index)
    if num_groups < 1 or len(names) % num_groups:
        raise ValueError(
            f"meda-vllm: kv_layer_groups={num_groups} must divide the model's "
            f"{len(names)} attention layers"
        )
    size = len(names) // num_groups
    return [names[i : i + size] for i in range(0, len(names), size)]


def apply() -> None:
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec

    from meda_vllm.vllm_adapter import settings

    if getattr(kv_cache_utils.get_kv_cache_groups, "_meda_patched", False):
        return
    orig = kv_cache_utils.get_kv_cache_groups

    def get_kv_cache_groups(vllm_config, kv_cache_spec):
        groups = orig(vllm_config, kv_cache_spec)
        server = settings.server_config_from_additional(
            getattr(vllm_config, "additional_config", None)
        )
        if server.kv_policy == "none" or server.kv_layer_groups == 1 or len(groups) != 1:
            return groups
        (group,) = groups
        if type(group.kv_cache_spec) is not FullAttentionSpec:
            return groups
        return [
            KVCacheGroupSpec(names, group.kv_cache_spec)
            for names in split_layers(list(group.layer_names), server.kv_layer_groups)
        ]

    get_kv_cache_groups._meda_patched = True
    kv_cache_utils.get_kv_cache_groups = get_kv_cache_groups
