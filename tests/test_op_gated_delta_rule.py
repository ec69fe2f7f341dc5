"""gated_delta_rule: the chunked "torch" backend against the reference loop and fla's naive oracle."""

from __future__ import annotations

import importlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.ops.gated_delta_rule import gated_delta_rule
from mixerzoo.testing import assert_rel_close

# Relative error bound: max |actual - expected| / max |expected|, on every output, state and gradient.
# float64: 1e-10. Both backends are exact algebra; what separates them is rounding (eps64 = 1.1e-16)
#   amplified by T <= 300 steps and the chunk's triangular solve (measured <= 3e-15).
# float32: 1e-5. eps32 = 6e-8; both float32 paths drift from the float64 truth by ~T * eps32 at most
#   (measured <= 1.4e-6 between them over T <= 300, strong decay and g == 0 included).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# fla's naive recurrence casts everything to float32 whatever the input, so its own rounding is
# ~T * eps32; ours in float32 and in float64 are held to the float32 bound against it (measured <= 2e-6).
FLA_TOL = 1e-5
# The decay's gradient is a sum over a state's K V products of both signs: fla's float32 rounds each term to
# eps32 = 6e-8 of the terms' size, which cancellation leaves up to ~K V eps32 of the result (K V <= 16 x 16
# here: 1.5e-5). Measured 1.3e-5 at T = 1, g_max = 1e-3 (our float64 reference against it), so 1e-4.
FLA_TOL_DG = 1e-4
_GDR = importlib.import_module("mixerzoo.ops.gated_delta_rule")  # the module (the package re-exports the function)

INPUTS = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(
    seed: int,
    batch: int,
    seq_len: int,
    heads: int,
    group: int,
    dim_k: int,
    dim_v: int,
    g_max: float,
    with_state: bool,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Random inputs as the mixer makes them: unit-norm keys, beta in (0, 1), g in [-g_max, 0]."""
    gen = torch.Generator().manual_seed(seed)
    value_heads = heads * group

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": randn(batch, seq_len, heads, dim_k),
        "k": F.normalize(randn(batch, seq_len, heads, dim_k), dim=-1),
        "v": randn(batch, seq_len, value_heads, dim_v),
        "g": -g_max * rand(batch, seq_len, value_heads) if g_max else torch.zeros(batch, seq_len, value_heads),
        "beta": rand(batch, seq_len, value_heads),
    }
    if with_state:
        inputs["initial_state"] = randn(batch, value_heads, dim_k, dim_v)
    return {name: t.to(dtype) for name, t in inputs.items()}


def run_with_grads(fn, inputs: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Outputs, final state and the gradients of a random linear loss of both w.r.t. every input."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    o, state = fn(**leaves)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
    loss = loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "state": state} | {f"d{name}": grad for name, grad in zip(leaves, grads)}


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.integers(1, 2),
        "seq_len": st.integers(1, 300),
        "heads": st.integers(1, 2),
        "group": st.sampled_from([1, 2]),
        "dim_k": st.sampled_from([4, 16]),
        "dim_v": st.sampled_from([4, 8, 16]),
        "g_max": st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5.0]),
        "with_state": st.booleans(),
    }
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@given(case=cases, chunk_size=st.sampled_from([16, 32, 64]))
def test_torch_matches_reference(dtype, case, chunk_size):
    inputs = make_inputs(**case, dtype=dtype)
    expected = run_with_grads(lambda **kw: gated_delta_rule(**kw, backend="reference"), inputs, case["seed"])
    actual = run_with_grads(
        lambda **kw: gated_delta_rule(**kw, backend="torch", chunk_size=chunk_size), inputs, case["seed"]
    )
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert_rel_close(actual[name], expected[name], TOL[dtype], name)


@pytest.mark.parametrize("form", ["transition", "recurrent"])
@given(case=cases, chunk_size=st.sampled_from([16, 32, 64]))
def test_both_chunk_forms_match_reference(form, case, chunk_size):
    """The [K, K] transition carry and the per-chunk recurrent carry, each forced whatever the shape,
    against the loop in float64: outputs, final state and every gradient."""
    inputs = make_inputs(**case, dtype=torch.float64)
    expected = run_with_grads(lambda **kw: gated_delta_rule(**kw, backend="reference"), inputs, case["seed"])
    with mock.patch.object(_GDR, "_transition_form", lambda *shape: form == "transition"):
        actual = run_with_grads(
            lambda **kw: gated_delta_rule(**kw, backend="torch", chunk_size=chunk_size), inputs, case["seed"]
        )
    for name in expected:
        assert_rel_close(actual[name], expected[name], TOL[torch.float64], f"{form} form: {name}")


@pytest.fixture(scope="module")
def fla_naive():
    module = pytest.importorskip(
        "fla.ops.gated_delta_rule", reason="fla-core is not installed: no fla oracle to compare with"
    )
    return module.naive_recurrent_gated_delta_rule


@given(case=cases)
def test_matches_fla_naive_recurrent(fla_naive, case):
    inputs = make_inputs(**case, dtype=torch.float32)
    group = case["group"]

    def fla_fn(q, k, v, g, beta, initial_state=None):
        # fla's naive loop has no grouped value heads: give each value head its own copy of q and k.
        q, k = (t.repeat_interleave(group, dim=2) for t in (q, k))
        return fla_naive(
            q=q, k=k, v=v, beta=beta, g=g, scale=q.shape[-1] ** -0.5,
            initial_state=initial_state, output_final_state=True,
        )

    expected = run_with_grads(fla_fn, inputs, case["seed"])
    for backend, dtype in (("torch", torch.float32), ("reference", torch.float64)):
        actual = run_with_grads(
            lambda **kw: gated_delta_rule(**kw, backend=backend),
            {name: t.to(dtype) for name, t in inputs.items()},
            case["seed"],
        )
        for name in expected:
            tol = FLA_TOL_DG if name == "dg" else FLA_TOL
            assert_rel_close(actual[name], expected[name], tol, f"{backend} {dtype} {name}")


@given(case=cases, split=st.floats(0.0, 1.0), chunk_size=st.sampled_from([16, 32, 64]))
def test_chunk_continuation(case, split, chunk_size):
    case = case | {"seq_len": max(case["seq_len"], 2)}
    inputs = make_inputs(**case, dtype=torch.float64)
    cut = 1 + int(split * (case["seq_len"] - 2))  # 1 <= cut < T
    o, state = gated_delta_rule(**inputs, backend="torch", chunk_size=chunk_size)
    initial = inputs.pop("initial_state", None)
    head = {name: t[:, :cut] for name, t in inputs.items()}
    tail = {name: t[:, cut:] for name, t in inputs.items()}
    o1, state1 = gated_delta_rule(**head, initial_state=initial, backend="torch", chunk_size=chunk_size)
    o2, state2 = gated_delta_rule(**tail, initial_state=state1, backend="torch", chunk_size=chunk_size)
    assert_rel_close(torch.cat((o1, o2), dim=1), o, TOL[torch.float64], "o")
    assert_rel_close(state2, state, TOL[torch.float64], "state")


def test_long_input_in_several_spans():
    """A sequence longer than the span of chunks the torch backend batches at once (here 16 chunks of 4)."""
    inputs = make_inputs(5, 1, 150, 2, 2, 8, 4, g_max=0.5, with_state=True, dtype=torch.float64)
    expected = run_with_grads(lambda **kw: gated_delta_rule(**kw, backend="reference"), inputs, 5)
    actual = run_with_grads(lambda **kw: gated_delta_rule(**kw, backend="torch", chunk_size=4), inputs, 5)
    for name in expected:
        assert_rel_close(actual[name], expected[name], TOL[torch.float64], name)


def test_decode_steps_match_one_call():
    """T = 1 calls (the single-step path) carried through the state equal one chunked call."""
    inputs = make_inputs(3, 2, 40, 2, 2, 8, 4, g_max=1.0, with_state=True, dtype=torch.float64)
    o, state = gated_delta_rule(**inputs, backend="torch", chunk_size=16)
    step_state = inputs.pop("initial_state")
    steps = []
    for t in range(40):
        o_t, step_state = gated_delta_rule(
            **{name: x[:, t : t + 1] for name, x in inputs.items()}, initial_state=step_state, backend="torch"
        )
        steps.append(o_t)
    assert_rel_close(torch.cat(steps, dim=1), o, TOL[torch.float64], "o")
    assert_rel_close(step_state, state, TOL[torch.float64], "state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_defaults(dtype):
    inputs = make_inputs(0, 1, 5, 2, 2, 4, 4, g_max=0.5, with_state=True, dtype=dtype)
    inputs["initial_state"] = inputs["initial_state"].float()
    before = inputs["initial_state"].clone()
    o, state = gated_delta_rule(**inputs)
    assert o.dtype == dtype and o.shape == (1, 5, 4, 4)
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert state.shape == (1, 4, 4, 4)
    assert torch.equal(inputs["initial_state"], before), "the initial state must not be modified"
    explicit = gated_delta_rule(**inputs, scale=4**-0.5, backend="torch")
    assert torch.equal(o, explicit[0]) and torch.equal(state, explicit[1]), "auto on CPU is 'torch', scale K**-0.5"


def _bad(**changes):
    inputs = make_inputs(0, 2, 5, 2, 2, 4, 3, g_max=0.5, with_state=True, dtype=torch.float32)
    return inputs | changes


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (_bad(q=torch.zeros(2, 5, 8)), ValueError, r"q must be \[B, T, H, K\], got \[2, 5, 8\]"),
        (_bad(k=torch.zeros(2, 5, 2, 5)), ValueError, r"k must be \[B, T, H, K\] = \[2, 5, 2, 4\], got \[2, 5, 2, 5\]"),
        (_bad(v=torch.zeros(2, 5, 3, 3)), ValueError, r"HV = 3 heads, not a multiple of the H = 2"),
        (_bad(v=torch.zeros(2, 6, 4, 3)), ValueError, r"v must be \[B, T, HV, V\]"),
        (_bad(beta=torch.zeros(2, 5)), ValueError, r"beta must be \[B, T, HV\] = \[2, 5, 4\], got \[2, 5\]"),
        (_bad(g=torch.zeros(2, 5, 2)), ValueError, r"g must be \[B, T, HV\] = \[2, 5, 4\] \(scalar decay\) or \[B, T, HV, K\] = \[2, 5, 4, 4\] "
         r"\(per-channel decay\), got \[2, 5, 2\]"),
        (_bad(initial_state=torch.zeros(2, 4, 3, 4)), ValueError, r"initial_state must be \[B, HV, K, V\]"),
        (_bad(q=torch.zeros(2, 5, 2, 4, dtype=torch.int64)), ValueError, r"q must be a floating-point tensor"),
        (_bad(backend="cuda"), ValueError, r"unknown backend 'cuda'"),
        (_bad(backend="flash"), ValueError, r"backend 'flash' is not available"),
        (_bad(backend="fla"), ValueError, r"backend 'fla' needs CUDA tensors"),
        (_bad(chunk_size=0), ValueError, r"chunk_size must be a positive int"),
    ],
    ids=["q-rank", "k-shape", "grouped-heads", "v-length", "beta-rank", "g-heads", "state", "int", "backend",
         "backend-for-other-op", "fla-on-cpu", "chunk-size"],
)
def test_bad_inputs_raise(kwargs, error, match):
    with pytest.raises(error, match=r"^gated_delta_rule: .*" + match):
        gated_delta_rule(**kwargs)


def test_empty_sequence_raises():
    inputs = make_inputs(0, 1, 1, 1, 1, 4, 4, g_max=0.5, with_state=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="T must be at least 1"):
        gated_delta_rule(**{name: t[:, :0] for name, t in inputs.items()})


@pytest.mark.parametrize("backend, seq_len", [("torch", 40), ("torch", 1), ("reference", 12)])
def test_autocast_does_not_change_the_float32_computation(backend, seq_len):
    """Under bf16 autocast the op still computes in float32: outputs and state bit-identical."""
    inputs = make_inputs(2, 2, seq_len, 2, 2, 8, 4, g_max=1.0, with_state=True, dtype=torch.float32)
    expected = gated_delta_rule(**inputs, backend=backend, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = gated_delta_rule(**inputs, backend=backend, chunk_size=8)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == torch.float32 and torch.equal(a, e)
