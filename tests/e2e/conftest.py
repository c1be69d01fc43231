"""Fixtures for end-to-end tests against a real `vllm serve` (CPU build)."""

from __future__ import annotations

import pytest

from tests.e2e.server import VLLMServer


def start_server(model, name: str, args: list[str], tmp_path_factory) -> VLLMServer:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    return VLLMServer(model, args, log).start()


@pytest.fixture(scope="session")
def server_factory(tiny_model_dir, tmp_path_factory):
    """Start servers on demand; each is started once per session and stopped at the end."""
    started: dict[str, VLLMServer] = {}

    def get(name: str, args: list[str]) -> VLLMServer:
        if name not in started:
            started[name] = start_server(tiny_model_dir, name, args, tmp_path_factory)
        return started[name]

    yield get
    for srv in started.values():
        srv.stop()
