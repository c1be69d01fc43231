"""Plain data passed between the serving engine and the compression core."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def check_query_positions(query_pos: Tensor, n: int) -> None:
    """``query_pos`` must be strictly ascending positions in ``[0, n)``.

    Reads the values, so on a GPU it synchronises: ``LayerView`` runs it only for CPU
    tensors, and the engine (``paged_view.plan_paged_request``) once per request."""
    if query_pos.numel() and (
        int(query_pos.min()) < 0
        or int(query_pos.max()) >= n
        or bool((query_pos[1:] <= query_pos[:-1]).any())
    ):
        raise ValueError(f"query_pos must be strictly ascending positions in [0, {n})")


#: LayerView fields an engine may hand over as zero-argument callables (computed on first use)
LAZY_FIELDS = ("keys", "values", "window_scores", "entropy")

#: ``merge(kept [H_kv, P], mode, weights [H_kv, N] | None) -> (keys, values)`` merged
#: ``[H_kv, P, D]`` entries for the kept slots (``merging.merge_evicted``'s contract)
Merger = Callable[[Tensor, str, "Tensor | None"], "tuple[Tensor | None, Tensor | None]"]


@dataclass(frozen=True)
class LayerView:
    """What the core sees of one layer of one request after its prefill.

    ``keys``/``values``: ``[H_kv, N, D]``, post-RoPE, any float dtype.
    ``queries``: ``[H, R, D]`` captured query rows (post-RoPE) at prompt positions
    ``query_pos`` (``[R]``, ascending, in ``[0, N)``). They always include the last
    ``min(w, N)`` positions, plus whatever ``compress.required_query_positions`` asked for.
    ``vis``: ``[N]`` bool, True for image/video tokens; None for a text-only request.
    ``scale``: softmax scale, default ``1/sqrt(D)``.

    Optional overrides the engine fills from its fast paged kernels; when present the
    policies use them instead of recomputing:
    ``window_scores``: ``[H_kv, N]`` fp32, sum over the score rows (the last
    ``Policy.score_rows(N)`` prompt queries: ``kv_window`` for every policy but H2O,
    ``min(N, kv_h2o_max_queries)`` for H2O) of the causal softmax, mean over the GQA group,
    before pooling. ``entropy``: MEDA cross-modal entropy of this layer (a float, or a 0-d
    tensor that MEDA copies to the host together with the other layers'; for a layer
    set's view, ``[L]``, one per layer).
    ``merge``: a :data:`Merger` that merges straight from the engine's cache (used instead
    of ``merging.merge_evicted`` on ``keys``/``values``).

    Lazy fields: ``keys``, ``values``, ``window_scores`` and ``entropy`` may be given as
    zero-argument callables; each is called on first access (then kept), so a policy pays
    only for what it reads: MEDA's budget pass reads only ``entropy``, a selection pass
    with the engine's ``merge`` never needs dense ``keys``. Lazy ``keys`` need ``shape``
    (``(H_kv, N, D)``); loaded values are checked against it.
    """

    keys: Tensor | Callable[[], Tensor]
    values: Tensor | Callable[[], Tensor]
    queries: Tensor
    query_pos: Tensor
    vis: Tensor | None = None
    scale: float | None = None
    window_scores: Tensor | Callable[[], Tensor] | None = None
    entropy: float | Tensor | Callable[[], float | Tensor] | None = None
    shape: tuple[int, int, int] | None = None
    merge: Merger | None = None

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if name in LAZY_FIELDS and callable(value):
            value = value()
            self._check_loaded(name, value)
            object.__setattr__(self, name, value)
        return value

    def _raw(self, name: str):
        return object.__getattribute__(self, name)

    def _check_loaded(self, name: str, value) -> None:
        h_kv, n, d = self.kv_shape
        if name in ("keys", "values") and (
            not isinstance(value, Tensor) or tuple(value.shape) != (h_kv, n, d)
        ):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"lazy {name} must be [H_kv, N, D] = {(h_kv, n, d)} (got {got})")
        if name == "window_scores" and (
            not isinstance(value, Tensor) or tuple(value.shape) != (h_kv, n)
        ):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"lazy window_scores must be [{h_kv}, {n}] (got {got})")

    def __post_init__(self) -> None:
        keys, values = self._raw("keys"), self._raw("values")
        if self.shape is not None:
            if len(self.shape) != 3 or any(int(x) < 0 for x in self.shape):
                raise ValueError(f"shape must be (H_kv, N, D) (got {self.shape!r})")
            object.__setattr__(self, "shape", tuple(int(x) for x in self.shape))
        elif callable(keys) or callable(values):
            raise ValueError("lazy keys/values need shape=(H_kv, N, D)")
        for name, t in (("keys", keys), ("values", values)):
            if not callable(t):
                self._check_eager(name, t)
        h_kv, n, d = self.kv_shape
        if self.queries.dim() != 3 or self.queries.shape[2] != d:
            raise ValueError(f"queries must be [H, R, {d}] (got {tuple(self.queries.shape)})")
        if self.queries.shape[0] % h_kv != 0:
            raise ValueError(
                f"query heads ({self.queries.shape[0]}) must be a multiple of KV heads ({h_kv})"
            )
        if self.query_pos.dim() != 1 or self.query_pos.numel() != self.queries.shape[1]:
            raise ValueError(
                f"query_pos must be [R] with R={self.queries.shape[1]} "
                f"(got {tuple(self.query_pos.shape)})"
            )
        if self.query_pos.device.type == "cpu":  # on a GPU: checked once per request
            check_query_positions(self.query_pos, n)
        if self.vis is not None and (self.vis.dtype != torch.bool or self.vis.shape != (n,)):
            raise ValueError(f"vis must be a bool tensor of shape [{n}] or None")
        scores = self._raw("window_scores")
        if scores is not None and not callable(scores):
            self._check_loaded("window_scores", scores)
        if self.merge is not None and not callable(self.merge):
            raise ValueError("merge must be a callable (kept, mode, weights) -> (keys, values)")

    def _check_eager(self, name: str, t) -> None:
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"keys and values must both be [H_kv, N, D] (got {name} {got})")
        want = self.shape
        other = self._raw("keys" if name == "values" else "values")
        if want is None and not callable(other) and tuple(other.shape) != tuple(t.shape):
            raise ValueError(
                f"keys and values must both be [H_kv, N, D] (got {tuple(self._raw('keys').shape)}"
                f" and {tuple(self._raw('values').shape)})"
            )
        if want is not None and tuple(t.shape) != want:
            raise ValueError(f"{name} must be {want} to match shape (got {tuple(t.shape)})")

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """``(H_kv, N, D)`` without loading lazy keys."""
        if self.shape is not None:
            return self.shape
        return tuple(self._raw("keys").shape)

    @property
    def N(self) -> int:  # noqa: N802 - the paper's name for the prompt length
        return self.kv_shape[1]

    @property
    def H(self) -> int:  # noqa: N802
        return self.queries.shape[0]

    @property
    def H_kv(self) -> int:  # noqa: N802
        return self.kv_shape[0]

    @property
    def D(self) -> int:  # noqa: N802
        return self.kv_shape[2]

    @property
    def device(self) -> torch.device:
        return self.queries.device

    @property
    def group(self) -> int:
        return self.H // self.H_kv

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.D)


@dataclass
class LayerPlan:
    """What to keep in one layer.

    ``kept``: ``[H_kv, P]`` ascending original positions (same count for every KV head).
    ``keys``/``values``: ``[H_kv, P, D]`` merged entries to write in the kept slots, or
    None when the kept entries are written unchanged. ``budget``: the layer's logical
    budget ``S_l``; ``P >= S_l`` when the plan was padded to a common physical length
    (``CompressionPlan.layer_set``, the plan of a layer set: one budget per layer, a list).
    """

    kept: Tensor
    keys: Tensor | None
    values: Tensor | None
    budget: int | list[int]
    #: a merge deferred to compaction (layer chunks: only one chunk's merged K/V exist at
    #: a time); ``merged()`` runs it. None: ``keys``/``values`` are final.
    pending: Callable[[], tuple[Tensor | None, Tensor | None]] | None = None

    def merged(self) -> tuple[Tensor | None, Tensor | None]:
        """The K/V to write in the kept slots (running a deferred merge, which reads the
        pages: call it before they are compacted)."""
        if self.pending is not None:
            return self.pending()
        return self.keys, self.values

    @property
    def physical_tokens(self) -> int:
        return self.kept.shape[1]


@dataclass
class CompressionPlan:
    """Per-layer plans of one request. ``n_tokens`` is the logical length ``N``."""

    layers: list[LayerPlan]
    n_tokens: int
    policy: str
    fallback: str | None
    entropy: list[float] | None
    layer_budgets: list[int]
    #: the plan of all layers at once (heads layer-major, ``[L * H_kv, P]``) when it was
    #: made from a layer set (``compress(layer_set=...)``); ``layers`` are views of it
    layer_set: LayerPlan | None = None
    #: the plans of layer chunks ``(lo, hi, plan of layers lo..hi-1 stacked)`` when the
    #: workspace did not fit all layers at once (``paged_view``); merges are deferred
    chunks: list[tuple[int, int, LayerPlan]] | None = None

    @property
    def merges(self) -> bool:
        """Whether any layer writes merged entries."""
        return any(lp.keys is not None for lp in self.layers) or any(
            part.pending is not None or part.keys is not None for _, _, part in self.chunks or ()
        )

    @property
    def kept_tokens(self) -> int:
        """Physical length: the most kept slots over layers."""
        return max((lp.kept.shape[1] for lp in self.layers), default=0)

    @property
    def logical_kept_tokens(self) -> int:
        """Kept tokens summed over layers (per KV head), before any padding."""
        return sum(self.layer_budgets)
