"""``vllm.renderers.online_renderer.OnlineRenderer``: ``render_chat``, ``render_completion``.

Why: vLLM builds a request's ``SamplingParams`` (where ``patches/sampling_params.py``
checks its ``kv_*`` overrides) only after rendering it, and rendering puts the request's
images and videos in the API server's multimodal cache as if the engine had them. A
request then refused for a bad ``kv_*`` setting never reaches the engine, and the next
request with the same image is sent as a cache hit the engine cannot resolve: HTTP 500
(vLLM: "P0/P1 cache drift"). Refusing bad settings before rendering keeps the caches in
step.

How: before the original, checks ``request.vllm_xargs`` as the request will get them
(the run-time defaults under them; ``settings.check_request``) and returns vLLM's own 400
``ErrorResponse`` naming the setting. The ``SamplingParams`` check stays (other entry
points: offline ``LLM``, the Responses API).

Remove when: vLLM validates ``extra_args`` through a plugin hook before rendering.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.renderers.online_renderer import OnlineRenderer

    from meda_vllm.config import ConfigError
    from meda_vllm.vllm_adapter import settings

    if getattr(OnlineRenderer, "_meda_patched", False):
        return

    def refusal(renderer, request):
        server = settings.server_config_seen()
        xargs = getattr(request, "vllm_xargs", None)
        if server is None or not isinstance(xargs, dict):
            return None
        try:
            settings.check_request(server, settings.with_runtime_defaults(xargs))
        except ConfigError as e:
            return renderer.create_error_response(str(e), param=settings.refused_field(e))
        return None

    for name in ("render_chat", "render_completion"):
        orig = getattr(OnlineRenderer, name)

        async def render(self, request, *args, _orig=orig, **kwargs):
            refused = refusal(self, request)
            if refused is not None:
                return refused
            return await _orig(self, request, *args, **kwargs)

        render.__name__ = render.__qualname__ = name
        setattr(OnlineRenderer, name, render)
    OnlineRenderer._meda_patched = True
