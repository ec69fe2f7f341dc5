"""mixerzoo.ops.attention: torch backend against the masked-softmax reference and fla's oracle."""

import importlib

import pytest
import torch
from hypothesis import given, strategies as st

from mixerzoo.ops import attention
from mixerzoo.testing import assert_close

attention_module = importlib.import_module("mixerzoo.ops.attention")  # the module, not the function


@st.composite
def attention_inputs(draw, dtype):
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    tk = draw(st.integers(1, 300))
    tq = draw(st.one_of(st.just(tk), st.just(1), st.integers(1, tk)))
    window = draw(st.one_of(st.none(), st.integers(1, tk), st.sampled_from([1, 2])))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, tq, heads, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, tk, kv_heads, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, tk, kv_heads, head_dim, generator=gen, dtype=dtype)
    return q, k, v, window


# float32: softmax of <= 300 keys in two summation orders differs by a few eps (1.2e-7);
# the bound is 1e-5 relative. float64: 1e-12.
@given(attention_inputs(torch.float32))
def test_torch_backend_equals_reference_float32(inputs):
    q, k, v, window = inputs
    expected = attention(q, k, v, window, backend="reference")
    got = attention(q, k, v, window, backend="torch")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@given(attention_inputs(torch.float64))
def test_torch_backend_equals_reference_float64(inputs):
    q, k, v, window = inputs
    torch.testing.assert_close(
        attention(q, k, v, window, backend="torch"), attention(q, k, v, window, backend="reference"), rtol=1e-12, atol=1e-12
    )


@given(attention_inputs(torch.float64))
def test_reference_equals_fla_naive_parallel_attn(inputs):
    naive = pytest.importorskip("fla.ops.attn.naive", reason="fla-core (the oracle extra) is not installed").naive_parallel_attn
    q, k, v, window = inputs
    tk = k.shape[1]
    q = torch.cat([torch.randn_like(k[:, :, :1]).expand(-1, -1, q.shape[2], -1)[:, : tk - q.shape[1]], q], dim=1)
    expected = naive(q, k, v, window_size=window)
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert_close(attention(q, k, v, window, backend="reference"), expected, "fla naive_parallel_attn", torch.float64)


@given(attention_inputs(torch.float64))
def test_bidirectional_torch_equals_reference(inputs):
    q, k, v, _ = inputs
    got = attention(q, k, v, causal=False, backend="torch")
    assert_close(got, attention(q, k, v, causal=False, backend="reference"), "bidirectional", torch.float64)
    if q.shape[1] == 1:  # the last position sees every key either way
        return
    assert not torch.allclose(got, attention(q, k, v, backend="torch")), "causal=False must see future keys"


def test_gradients_of_torch_backend_match_reference():
    gen = torch.Generator().manual_seed(0)
    for window in (None, 1, 7, 200):
        q, k, v = (torch.randn(2, n, h, 8, generator=gen, dtype=torch.float64, requires_grad=True)
                   for n, h in ((150, 4), (300, 2), (300, 2)))
        grads = [torch.autograd.grad(attention(q, k, v, window, backend=b).square().sum(), (q, k, v))
                 for b in ("torch", "reference")]
        for fast, ref, name in zip(*grads, "qkv"):
            assert_close(fast, ref, f"d/d{name} window={window}", torch.float64)


def test_windowed_torch_backend_never_builds_a_t_by_t_mask(monkeypatch):
    shapes = []
    original = attention_module._allowed

    def spy(query_pos, key_pos, window):
        shapes.append((len(query_pos), len(key_pos)))
        return original(query_pos, key_pos, window)

    monkeypatch.setattr(attention_module, "_allowed", spy)
    t, window = 8192, 64
    q = torch.randn(1, t, 1, 4)
    attention(q, q, q, window, backend="torch")
    assert shapes, "the windowed path built no block mask at all"
    largest = max(a * b for a, b in shapes)
    assert largest <= 2 * attention_module._MIN_BLOCK * (attention_module._MIN_BLOCK + window), shapes[:3]


@pytest.mark.parametrize(
    "shapes, kwargs, message",
    [
        (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4)), {}, "v must be"),
        (((2, 3, 4, 8), (2, 3, 3, 8), (2, 3, 3, 8)), {}, "multiple of KV heads"),
        (((2, 5, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)), {}, "Tq <= Tk"),
        (((2, 3, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)), {}, "batch"),
        (((2, 3, 4, 8), (2, 3, 4, 6), (2, 3, 4, 8)), {}, "head dim"),
        (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)), {"window": 0}, "window must be"),
        (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)), {"backend": "cudnn"}, "unknown backend"),
        (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)), {"backend": "flash"}, "needs CUDA"),
        (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)), {"window": 2, "causal": False}, "window needs causal"),
    ],
)
def test_bad_inputs_raise_clear_errors(shapes, kwargs, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **kwargs)


# FlexAttention off CUDA runs its eager reference implementation (slow to start per shape), so a
# few fixed cases: a chunk after a prefix, with and without a window, one query, and GQA.
@pytest.mark.parametrize("tq, tk, heads, kv_heads, window", [
    (37, 50, 4, 2, None), (37, 50, 4, 2, 8), (1, 50, 2, 2, 8), (64, 64, 4, 1, 1), (20, 20, 2, 1, 300),
])
def test_flex_backend_equals_reference(tq, tk, heads, kv_heads, window):
    gen = torch.Generator().manual_seed(tq * tk)
    q = torch.randn(2, tq, heads, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, tk, kv_heads, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = attention(q, k, v, window, backend="reference")
    assert_close(attention(q, k, v, window, backend="flex"), expected, f"flex, window={window}", torch.float64)
    if window is None:
        expected = attention(q, k, v, causal=False, backend="reference")
        assert_close(attention(q, k, v, causal=False, backend="flex"), expected, "flex bidirectional", torch.float64)
