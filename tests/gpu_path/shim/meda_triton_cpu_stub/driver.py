"""Driver half of the stub "cpu" backend: never active, so never chosen by Triton."""

from __future__ import annotations

from triton.backends.driver import DriverBase

_MESSAGE = "meda test shim: the 'cpu' Triton driver is a stub; run with TRITON_INTERPRET=1"


class StubCPUDriver(DriverBase):
    @classmethod
    def is_active(cls) -> bool:
        return False

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError(_MESSAGE)

    def get_current_target(self):
        raise RuntimeError(_MESSAGE)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError(_MESSAGE)
