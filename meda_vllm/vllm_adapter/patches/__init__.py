"""Every change meda-vllm makes inside vLLM: one module per vLLM target, applied from
``plugin.PATCHES`` by ``plugin.register()``.

Each module's docstring says what it patches, why, how, and when it can go; PATCHES.md is
rendered from them (``python -m meda_vllm.vllm_adapter.patch_doc``, checked by a test).
A patch module imports vLLM and meda's logic inside its ``apply`` only, so a process pays
for the patches of the vLLM modules it actually imports; meda's logic modules never
import a patch module's package face (this file stays empty).
"""
