"""causal_conv1d: the packed torch form against the time loop, with pads anywhere and a carried tail."""

import pytest
import torch
from hypothesis import given, strategies as st

from mixerzoo.ops.conv import causal_conv1d
from mixerzoo.testing import assert_close


@st.composite
def conv_inputs(draw):
    batch, length, channels, taps = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(batch, length, channels, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, taps, generator=gen, dtype=torch.float64)
    tail = torch.randn(batch, taps - 1, channels, generator=gen, dtype=torch.float64)
    valid = torch.rand(batch, length, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    bias = torch.randn(channels, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    return x, weight, tail, valid, bias


@given(conv_inputs())
def test_torch_equals_reference_with_pads(inputs):
    x, weight, tail, valid, bias = inputs
    y_ref, tail_ref = causal_conv1d(x, weight, tail, valid, bias, backend="reference")
    y, new_tail = causal_conv1d(x, weight, tail, valid, bias, backend="torch")
    assert_close(y, y_ref, "outputs", torch.float64)
    assert_close(new_tail, tail_ref, "tail", torch.float64)
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))


@given(conv_inputs())
def test_pads_are_skipped_and_chunks_compose(inputs):
    x, weight, tail, valid, bias = inputs
    y, final = causal_conv1d(x, weight, tail, valid, bias)
    for row in range(x.shape[0]):  # the row's valid tokens alone, one by one
        state, outs = tail[row : row + 1], []
        for t in valid[row].nonzero().flatten().tolist():
            out, state = causal_conv1d(x[row : row + 1, t : t + 1], weight, state, bias=bias)
            outs.append(out)
        if outs:
            assert_close(y[row, valid[row]], torch.cat(outs, dim=1)[0], f"row {row} outputs", torch.float64)
        assert_close(final[row : row + 1], state, f"row {row} tail", torch.float64)


def test_bad_shapes():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"tail must be \[B, W - 1, C\] = \[2, 3, 3\]"):
        causal_conv1d(x, torch.randn(3, 4), torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, torch.randn(4, 4), torch.zeros(2, 3, 3))
