"""LayerView's lazy fields: computed once, on first use, checked against ``shape``."""

from __future__ import annotations

import pytest
import torch

from meda_vllm.types import LayerView


def _lazy_view(calls: dict, h_kv=2, n=10, d=4, **over):
    def counted(name, value):
        def load():
            calls[name] = calls.get(name, 0) + 1
            return value

        return load

    fields = dict(
        keys=counted("keys", torch.randn(h_kv, n, d)),
        values=counted("values", torch.randn(h_kv, n, d)),
        queries=torch.randn(4, 3, d),
        query_pos=torch.tensor([7, 8, 9]),
        window_scores=counted("window_scores", torch.rand(h_kv, n)),
        entropy=counted("entropy", 1.5),
        shape=(h_kv, n, d),
    )
    fields.update(over)
    return LayerView(**fields)


def test_lazy_fields_load_once_on_first_use():
    calls = {}
    view = _lazy_view(calls)
    assert (view.N, view.H_kv, view.D, view.group) == (10, 2, 4, 2)  # from shape
    assert calls == {}
    assert view.entropy == 1.5 and view.entropy == 1.5
    assert calls == {"entropy": 1}
    first = view.window_scores
    assert view.window_scores is first and calls["window_scores"] == 1
    assert view.keys.shape == (2, 10, 4) and calls.get("values") is None
    assert view.device == torch.device("cpu")


def test_lazy_keys_need_a_shape_and_must_match_it():
    with pytest.raises(ValueError, match="need shape"):
        LayerView(
            keys=lambda: torch.zeros(2, 10, 4),
            values=torch.zeros(2, 10, 4),
            queries=torch.randn(4, 3, 4),
            query_pos=torch.tensor([7, 8, 9]),
        )
    view = _lazy_view({}, keys=lambda: torch.zeros(2, 9, 4))
    with pytest.raises(ValueError, match="lazy keys"):
        _ = view.keys
    view = _lazy_view({}, window_scores=lambda: torch.zeros(2, 9))
    with pytest.raises(ValueError, match="lazy window_scores"):
        _ = view.window_scores


def test_eager_views_are_checked_as_before():
    keys = torch.zeros(2, 10, 4)
    with pytest.raises(ValueError, match="keys and values"):
        LayerView(
            keys=keys,
            values=torch.zeros(2, 9, 4),
            queries=torch.randn(4, 3, 4),
            query_pos=torch.tensor([7, 8, 9]),
        )
    with pytest.raises(ValueError, match="to match shape"):
        LayerView(
            keys=keys,
            values=keys,
            queries=torch.randn(4, 3, 4),
            query_pos=torch.tensor([7, 8, 9]),
            shape=(2, 11, 4),
        )
    with pytest.raises(ValueError, match="query_pos"):
        _lazy_view({}, query_pos=torch.tensor([7, 8, 10]))
    with pytest.raises(ValueError, match="merge must be a callable"):
        _lazy_view({}, merge="average")


def test_layer_entropies_read_tensor_overrides_in_order():
    """MEDA's budget pass: engine overrides may be 0-d tensors (copied to the host once)."""
    from meda_vllm.entropy import layer_entropy_value, to_host_floats

    def entropies(views):
        return to_host_floats([layer_entropy_value(v, 4, 8, False) for v in views])

    values = [0.5, torch.tensor(1.25), torch.tensor([2.0]), 3]
    views = [_lazy_view({}, entropy=v) for v in values]
    assert entropies(iter(views)) == [0.5, 1.25, 2.0, 3.0]
    lazy = [_lazy_view({}, entropy=lambda v=v: torch.tensor(v)) for v in (0.1, 0.2)]
    assert entropies(lazy) == pytest.approx([0.1, 0.2])
