"""What the scheduler and the workers tell each other, on vLLM's own step messages.

The decision to compress travels to the workers on the ``SchedulerOutput`` (attribute
``ARM_ATTR``: the ids of the requests to compress after this step's forward; each worker
resolved a request's settings when it was added). The kept length comes back on the
``ModelRunnerOutput`` (attribute ``RESULT_ATTR``: ``{rid: (N, P)}``; ``P = RECOMPUTE``
when compaction failed half way: the scheduler then preempts the request, which is
recomputed uncompressed). Both objects are plain dataclasses pickled between processes.
"""

from __future__ import annotations

ARM_ATTR = "meda_compress"
RESULT_ATTR = "meda_compressed"
#: the kept length a worker reports when a request's pages may be partly rewritten
RECOMPUTE = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
