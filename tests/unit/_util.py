"""Synthetic requests for the core tests: random post-RoPE Q/K/V per layer, a modality
layout, an optional planted needle, and views that carry only the captured query rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from meda_vllm.compress import required_query_positions
from meda_vllm.config import KVPolicyConfig
from meda_vllm.types import LayerView

EVICTING_POLICIES = ("streamingllm", "h2o", "snapkv", "pyramidkv", "lookm", "meda", "madakv")
# Policies whose kept set depends on attention (StreamingLLM only looks at positions).
ATTENTION_POLICIES = tuple(p for p in EVICTING_POLICIES if p != "streamingllm")


def default_layout(n: int) -> Tensor:
    """Text prefix, one image, text suffix (the question); text-only below 10 tokens."""
    vis = torch.zeros(n, dtype=torch.bool)
    if n >= 10:
        vis[n // 10 : n // 10 + int(0.6 * n)] = True
    return vis


@dataclass
class SyntheticRequest:
    queries: list[Tensor]  # per layer [H, N, D]: every prompt row (tests may use all)
    keys: list[Tensor]  # per layer [H_kv, N, D]
    values: list[Tensor]
    vis: Tensor | None
    needle: int | None = None
    calls: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.keys[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def view(self, layer: int, positions: Tensor, **overrides) -> LayerView:
        positions = positions.long()
        return LayerView(
            keys=self.keys[layer],
            values=self.values[layer],
            queries=self.queries[layer][:, positions],
            query_pos=positions,
            vis=self.vis,
            **overrides,
        )

    def get_view(self, cfg: KVPolicyConfig, **overrides) -> Callable[[int], LayerView]:
        """What the engine does: capture only the rows the config asks for."""
        positions = required_query_positions(cfg, self.n, self.vis)

        def get(layer: int) -> LayerView:
            self.calls.append(layer)
            return self.view(layer, positions, **overrides)

        return get


def make_request(
    *,
    num_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 1,
    n: int = 64,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    vis: Tensor | None | str = "default",
    needle: int | None = None,
    window: int = 32,
    sharpness: list[float] | None = None,
    seed: int = 0,
) -> SyntheticRequest:
    """Random request. ``needle``: a key aligned with the last ``window`` queries of every
    head, so it takes most of their attention. ``sharpness``: per-layer query scale."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(vis, str):
        vis = default_layout(n)
    qs, ks, vs = [], [], []
    u = torch.randn(head_dim, generator=gen)
    u = u / u.norm()
    for layer in range(num_layers):
        scale = 1.0 if sharpness is None else sharpness[layer]
        q = torch.randn(heads, n, head_dim, generator=gen) * scale
        k = torch.randn(kv_heads, n, head_dim, generator=gen)
        v = torch.randn(kv_heads, n, head_dim, generator=gen)
        if needle is not None:
            w = min(window, n)
            q[:, n - w :] = 4.0 * u + 0.5 * torch.randn(heads, w, head_dim, generator=gen)
            k[:, needle] = 3.0 * math.sqrt(head_dim) * u
        qs.append(q.to(dtype))
        ks.append(k.to(dtype))
        vs.append(v.to(dtype))
    return SyntheticRequest(qs, ks, vs, vis, needle)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """One decode step of GQA attention over a cache (the thing a plan must not disturb).

    ``q``: ``[H, D]``; ``keys``/``values``: ``[H_kv, S, D]``. fp32 result ``[H, D]``.
    """
    h, d = q.shape
    group = h // keys.shape[0]
    k = keys.float().repeat_interleave(group, 0)
    v = values.float().repeat_interleave(group, 0)
    att = torch.softmax(torch.einsum("hd,hsd->hs", q.float(), k) / math.sqrt(d), dim=-1)
    return torch.einsum("hs,hsd->hd", att, v)


def apply_layer_plan(keys: Tensor, values: Tensor, plan) -> tuple[Tensor, Tensor]:
    """The compacted cache of one layer as the engine would write it."""
    idx = plan.kept[..., None].expand(-1, -1, keys.shape[-1])
    new_k = keys.gather(1, idx) if plan.keys is None else plan.keys
    new_v = values.gather(1, idx) if plan.values is None else plan.values
    return new_k, new_v


def entropy_request(seed: int, heterogeneous: bool, n: int = 480) -> SyntheticRequest:
    """The entropy-tracking layers (test_entropy.py, benchmarks/entropy_sample.py): 5
    layers with query scales 0.5 to 3, GQA 2, D 16; ``heterogeneous`` also scales each
    row's queries by a temperature drawn from U[0.25, 1.75]."""
    req = make_request(
        num_layers=5, heads=4, kv_heads=2, n=n, head_dim=16,
        sharpness=[0.5, 1.0, 1.5, 2.0, 3.0], seed=seed,
    )  # fmt: skip
    if heterogeneous:
        gen = torch.Generator().manual_seed(100 + seed)
        for layer in range(5):
            temp = torch.rand(n, generator=gen) * 1.5 + 0.25
            req.queries[layer] = req.queries[layer] * temp[None, :, None]
    return req
