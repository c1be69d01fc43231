"""Compiler half of the stub "cpu" backend: supports no target."""

from __future__ import annotations

from triton.backends.compiler import BaseBackend

_MESSAGE = "meda test shim: the 'cpu' Triton backend is a stub; run with TRITON_INTERPRET=1"


class StubCPUBackend(BaseBackend):
    @staticmethod
    def supports_target(target) -> bool:
        return False

    def hash(self) -> str:
        return "meda-gpu-path-shim-stub"

    def parse_options(self, options: dict) -> object:
        raise RuntimeError(_MESSAGE)

    def add_stages(self, stages: dict, options: object, language) -> None:
        raise RuntimeError(_MESSAGE)

    def load_dialects(self, context) -> None:
        return None

    def get_module_map(self) -> dict:
        return {}
