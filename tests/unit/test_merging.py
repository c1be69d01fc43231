"""Merging evicted entries into their nearest kept key: checked against a naive loop and
by conservation of (weighted) mass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meda_vllm import merging
from meda_vllm.merging import evicted_positions, merge_evicted, nearest_kept


def setup(n=40, s=10, h_kv=3, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(h_kv, n, d, generator=gen).to(dtype)
    values = torch.randn(h_kv, n, d, generator=gen).to(dtype)
    kept = torch.stack([torch.randperm(n, generator=gen)[:s].sort().values for _ in range(h_kv)])
    weights = torch.rand(h_kv, n, generator=gen)
    return keys, values, kept, weights


def naive_merge(keys, values, kept, weights, mode):
    h_kv, n, _ = keys.shape
    out_k, out_v = [], []
    for h in range(h_kv):
        kept_h = kept[h].tolist()
        acc_k = {
            t: [keys[h, t].double(), 1.0 if mode == "average" else float(weights[h, t])]
            for t in kept_h
        }
        acc_v = {t: values[h, t].double() * acc_k[t][1] for t in kept_h}
        acc_k = {t: [v[0] * v[1], v[1]] for t, v in acc_k.items()}
        for e in range(n):
            if e in kept_h:
                continue
            sims = [
                float(F.cosine_similarity(keys[h, e].double(), keys[h, t].double(), 0))
                for t in kept_h
            ]
            t = kept_h[max(range(len(sims)), key=lambda i: (sims[i], -i))]
            w = 1.0 if mode == "average" else float(weights[h, e])
            acc_k[t][0] = acc_k[t][0] + keys[h, e].double() * w
            acc_k[t][1] += w
            acc_v[t] = acc_v[t] + values[h, e].double() * w
        out_k.append(torch.stack([acc_k[t][0] / acc_k[t][1] for t in kept_h]))
        out_v.append(torch.stack([acc_v[t] / acc_k[t][1] for t in kept_h]))
    return torch.stack(out_k), torch.stack(out_v)


@pytest.mark.parametrize("mode", ["average", "weighted"])
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_matches_naive(mode, seed):
    keys, values, kept, weights = setup(seed=seed)
    if mode == "weighted":
        weights = weights + 0.1  # keep the floor negligible for the comparison
    got_k, got_v = merge_evicted(keys, values, kept, mode, weights)
    want_k, want_v = naive_merge(keys, values, kept, weights + merging._WEIGHT_FLOOR, mode)
    torch.testing.assert_close(got_k.double(), want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_v.double(), want_v, atol=1e-5, rtol=1e-5)


def test_average_conserves_mass():
    keys, values, kept, _ = setup(n=200, s=30, seed=3)
    merged_k, merged_v = merge_evicted(keys, values, kept, "average")
    ev = evicted_positions(kept, 200)
    target = nearest_kept(keys, kept, ev)
    count = torch.ones(3, 30).scatter_add_(1, target, torch.ones_like(target, dtype=torch.float))
    torch.testing.assert_close((merged_k * count[..., None]).sum(1), keys.sum(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        (merged_v * count[..., None]).sum(1), values.sum(1), atol=1e-4, rtol=0
    )


def test_none_and_full_keep_are_unchanged():
    keys, values, kept, _ = setup()
    assert merge_evicted(keys, values, kept, "none") == (None, None)
    everything = torch.arange(40).expand(3, 40)
    assert merge_evicted(keys, values, everything, "average") == (None, None)


def test_nearest_is_within_the_same_head():
    keys, values, kept, _ = setup(h_kv=2)
    keys[1] = -keys[1]  # head 1's nearest neighbours are unchanged by a sign flip...
    ev = evicted_positions(kept, 40)
    a = nearest_kept(keys, kept, ev)
    keys2 = keys.clone()
    keys2[0] = torch.randn_like(keys2[0])  # ...and unaffected by head 0
    b = nearest_kept(keys2, kept, ev)
    assert torch.equal(a[1], b[1])


def test_dtype_preserved_and_chunking(monkeypatch):
    keys, values, kept, weights = setup(n=300, s=40, dtype=torch.bfloat16)
    a = merge_evicted(keys, values, kept, "weighted", weights)
    monkeypatch.setattr(merging, "_MAX_ELEMS", 40 * 7)
    b = merge_evicted(keys, values, kept, "weighted", weights)
    assert a[0].dtype == torch.bfloat16 and a[1].dtype == torch.bfloat16
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_mode():
    keys, values, kept, _ = setup()
    with pytest.raises(ValueError, match="merge must be"):
        merge_evicted(keys, values, kept, "pivotal")
    with pytest.raises(ValueError, match="attention scores"):
        merge_evicted(keys, values, kept, "weighted", None)
