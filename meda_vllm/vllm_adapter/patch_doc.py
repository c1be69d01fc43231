"""Renders PATCHES.md from the patch modules' docstrings, in the order of ``plugin.PATCHES``.

python -m meda_vllm.vllm_adapter.patch_doc > meda_vllm/vllm_adapter/PATCHES.md
"""

from __future__ import annotations

import sys
from types import ModuleType

from meda_vllm.vllm_adapter.plugin import AT_SETUP, PATCHES

_HEADER = """\
# Patches of vLLM internals

<!-- Rendered from the docstrings of meda_vllm/vllm_adapter/patches/*.py by
`python -m meda_vllm.vllm_adapter.patch_doc`; a test checks it. Edit the docstrings. -->

Everything meda-vllm changes inside vLLM is listed here, one section per file of
`meda_vllm/vllm_adapter/patches/`. Supported range: `vllm>=0.32,<0.33`, checked once by
`compat.check_vllm_version()` when the `vllm.general_plugins` entry point runs
(`plugin.register()`). `plugin.py` applies each patch of `patches.PATCHES` when its target
module is first imported in a process (or at once if already imported), once,
idempotently; each only changes behaviour when the server runs with a `--kv-policy` other
than `none` (stock vLLM otherwise; the flag parser additions are the exception).

Not patched: the attention kernels, the block pool, the KV cache tensors' allocation. The
CPU page layout is read by probing CPU_ATTN's own write op (`layouts.probe_cpu_layout`),
not assumed.
"""


def modules() -> list[ModuleType]:
    """The patch modules in the order of ``PATCHES``, then those applied at setup."""
    out: list[ModuleType] = []
    for _, apply in PATCHES:
        module = sys.modules[apply.__module__]
        if module not in out:
            out.append(module)
    return out + [m for m in AT_SETUP if m not in out]


def render() -> str:
    """PATCHES.md: the header, then each patch module's docstring under its file name."""
    parts = [_HEADER]
    for module in modules():
        name = module.__name__.rsplit(".", 1)[1]
        triggers = [t for t, apply in PATCHES if apply.__module__ == module.__name__]
        when = (
            "applied when " + ", ".join(f"`{t}`" for t in triggers) + " is imported"
            if triggers
            else "applied while compression is set up (at engine start)"
        )
        parts.append(f"## `patches/{name}.py`\n\n_{when}_\n\n{module.__doc__.strip()}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
