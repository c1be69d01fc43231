"""``vllm.sampling_params.SamplingParams._verify_args`` and ``._verify_extra_args``.

Why: per-request overrides (``vllm_xargs``: ``kv_budget``, ``kv_policy``, ...) must be
refused with HTTP 400 and one line while the request is built, never crash the engine.

How: ``_verify_args``, before the original: puts the defaults changed at run time
(``PUT /v1/kv/policy``, ``admin.py``) under the request's own overrides
(``settings.with_runtime_defaults``; the original checks ``extra_args`` only when there
are some). ``_verify_extra_args``, after the original: validates the overrides against
the server's settings (``settings.check_request``; the same check runs earlier, before the
request is rendered: ``patches/online_renderer.py``) and raises ``VLLMValidationError``
(-> 400) naming the setting.

Remove when: vLLM validates ``extra_args`` through a plugin hook.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from meda_vllm.config import ConfigError
    from meda_vllm.vllm_adapter import settings

    if getattr(SamplingParams, "_meda_patched", False):
        return
    orig = SamplingParams._verify_extra_args
    orig_args = SamplingParams._verify_args

    def _verify_args(self):
        if settings.server_config_seen() is not None:
            self.extra_args = settings.with_runtime_defaults(self.extra_args)
        orig_args(self)

    def _verify_extra_args(self):
        orig(self)
        server = settings.server_config_seen()
        if server is None:
            return
        try:
            settings.check_request(server, self.extra_args)
        except ConfigError as e:
            raise VLLMValidationError(str(e), parameter=settings.refused_field(e)) from None

    SamplingParams._verify_args = _verify_args
    SamplingParams._verify_extra_args = _verify_extra_args
    SamplingParams._meda_patched = True
