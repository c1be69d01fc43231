"""GPU code path on CPU: opt-in (slow); servers started once per session, concurrently.

Collected but skipped unless ``MEDA_GPU_PATH_TESTS=1`` or ``-m gpu_path`` selects them
(``scripts/test-gpu-path.sh`` does both).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tests.e2e.server import VLLMServer
from tests.gpu_path.server import CPU_PATH_ARGS, GpuPathServer

HERE = Path(__file__).resolve().parent
ENV_FLAG = "MEDA_GPU_PATH_TESTS"


def _asked_for(config: pytest.Config) -> bool:
    if os.environ.get(ENV_FLAG) == "1":
        return True
    markexpr = config.getoption("markexpr", "") or ""
    return "gpu_path" in markexpr and "not gpu_path" not in markexpr


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _asked_for(config):
        return
    skip = pytest.mark.skip(reason=f"GPU-path tests are opt-in: {ENV_FLAG}=1 or -m gpu_path")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def start_servers(tiny_model_dir, tmp_path_factory):
    """``start_servers({name: (flags, shim)})`` starts the servers not yet running, all at
    once (startup is mostly single-threaded imports: two overlap well on two cores), and
    returns ``{name: server}``. ``shim=False`` is the production CPU path (V1 runner +
    CPU_ATTN) with the same engine flags. Everything is stopped at the end of the session.
    """
    started: dict[str, GpuPathServer | VLLMServer] = {}
    logs = tmp_path_factory.mktemp("gpu-path-logs")

    def make(name: str, flags: list[str], shim: bool):
        log = logs / f"{name}.log"
        if shim:
            return GpuPathServer(tiny_model_dir, flags, log, logs / f"{name}-kernels")
        return VLLMServer(tiny_model_dir, [*CPU_PATH_ARGS, *flags], log)

    def start(specs: dict[str, tuple[list[str], bool]]) -> dict[str, GpuPathServer | VLLMServer]:
        new = {n: make(n, flags, shim) for n, (flags, shim) in specs.items() if n not in started}
        errors: dict[str, BaseException] = {}

        def run(name: str) -> None:
            try:
                new[name].start()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors[name] = e

        threads = [threading.Thread(target=run, args=(n,)) for n in new]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started.update({n: s for n, s in new.items() if n not in errors})
        if errors:
            name, err = next(iter(errors.items()))
            raise RuntimeError(f"server {name!r} did not start: {err}") from err
        return {n: started[n] for n in specs}

    yield start
    for srv in started.values():
        srv.stop()
