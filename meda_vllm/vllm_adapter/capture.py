"""Keep the query rows a policy needs while prefill chunks pass the attention layers.

The paged cache holds only keys and values; scoring needs query rows (the
observation window, MEDA's sampled visual rows), which exist only inside the
attention call. ``patches/attention.py`` wraps ``layer.impl.forward`` of every
decoder attention layer of the model. The runner hook sets the step's
``CaptureStep`` before the forward; layers copy the rows it asks for.
The buffer is bounded: rows x heads x head_size per layer and request, freed
when the request is compressed, finishes or is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CaptureTarget:
    """One request's rows to copy in this step."""

    rid: str
    batch_index: torch.Tensor  # [r] rows of the batch's query tensor
    slot: torch.Tensor  # [r] where they go in the request's buffer


@dataclass
class RequestCapture:
    """Captured query rows of one request: ``rows[layer]`` is ``[R, H, D]``."""

    positions: torch.Tensor  # [R] ascending prompt positions to capture
    rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def buffer(self, layer: int, heads: int, head_size: int, like: torch.Tensor) -> torch.Tensor:
        buf = self.rows.get(layer)
        if buf is None:
            buf = torch.zeros(
                (self.positions.numel(), heads, head_size), dtype=like.dtype, device=like.device
            )
            self.rows[layer] = buf
        return buf


class CaptureStep:
    """The capture work of one forward step (set by the runner hook)."""

    def __init__(self, targets: list[CaptureTarget], requests: dict[str, RequestCapture]):
        self.targets = targets
        self.requests = requests

    def take(self, layer_index: int, query: torch.Tensor, head_size: int) -> None:
        q = query.view(query.shape[0], -1, head_size)
        for t in self.targets:
            cap = self.requests.get(t.rid)
            if cap is None:
                continue
            buf = cap.buffer(layer_index, q.shape[1], head_size, q)
            buf[t.slot] = q[t.batch_index].to(buf.dtype)


_CURRENT: list[CaptureStep | None] = [None]


def set_step(step: CaptureStep | None) -> None:
    _CURRENT[0] = step


def current_step() -> CaptureStep | None:
    return _CURRENT[0]
