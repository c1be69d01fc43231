"""Record the Triton launches the ops would make on a GPU, on a machine without one.

Test and tooling machinery (``compile_check``, the kernel tests), kept off the runtime
path: for the duration of :func:`recording_launches` it stands in for three functions of
``meda_vllm.kernels.dispatch`` (the launchers call them through the module), so the
launchers take their GPU branch and record each launch instead of running it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from meda_vllm.kernels import dispatch


@dataclass
class LaunchRecord:
    """One kernel launch a launcher asked for while :func:`recording_launches` was active."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, launches: list[LaunchRecord]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(LaunchRecord(self.kernel, tuple(grid), args, kwargs))

        return launch


_ACTIVE = False


@contextlib.contextmanager
def recording_launches(num_sms: int = 132):
    """Record the launches the ops would make on a GPU with ``num_sms`` SMs, run nothing.

    Inside the block the launchers take their GPU branch (tile sizes, split counts, tensor
    core operand types) even for CPU tensors and every ``dispatch.launchable(...)[grid]
    (...)`` call is appended to the yielded list instead of running. Outputs the kernels
    would write stay as allocated, so a launcher that reads a kernel's output on the host
    sees whatever ``torch.empty`` returned.
    """
    global _ACTIVE
    if _ACTIVE:
        raise RuntimeError("recording_launches() does not nest")
    launches: list[LaunchRecord] = []
    saved = {name: getattr(dispatch, name) for name in ("launchable", "is_interpreted", "num_sms")}
    dispatch.launchable = lambda kernel, device: _Recorder(kernel, launches)
    dispatch.is_interpreted = lambda device: False
    dispatch.num_sms = lambda device: num_sms
    _ACTIVE = True
    try:
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(dispatch, name, fn)
        _ACTIVE = False
