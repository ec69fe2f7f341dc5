"""ssd (Mamba2): the chunked "torch" backend against the reference loop and fla's naive simple-GLA oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.ops.ssd import ssd
from mixerzoo.testing import assert_rel_close

# Relative error bound: max |actual - expected| / max |expected|, on every output, state and gradient.
# float64: 1e-10. Both backends are exact algebra; what separates them is rounding (eps64 = 1.1e-16)
#   amplified by T <= 300 steps (measured <= 3e-15; 1e-13 for A's gradient, a long sum).
# float32: 1e-5. eps32 = 6e-8; both float32 paths drift from the float64 truth by ~T * eps32 at most
#   (measured <= 1.2e-6 between them).
# A's gradient is the exception: it adds up Bt * T per-step products dt * <dL/dS_t, exp(dt A) S_{t-1}> that
#   largely cancel (plain relative errors of float32 reached ~1e-5 for torch and 3.5e-4 for fla; with T = 1
#   and no initial state the true value is exactly 0 and fla's is 4e-8), so float32 is held to TOL times the
#   size of those products (decay_gradient_terms, assert_sum_close).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# fla's naive chunked simple GLA casts everything to float32 (and weights pairs by exp of differences of
# prefix sums of the log decays, which costs it a little more: measured <= 3.6e-6 against our float64
# reference), so ours in float32 and in float64 are held to the float32 bound against it.
FLA_TOL = 1e-5


def assert_sum_close(actual: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor, tol: float, what: str) -> None:
    """For a gradient that sums many terms: error within tol of the largest sum of |terms| (per element)."""
    assert actual.shape == expected.shape == terms.shape, what
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{what}: non-finite values"
    error = (actual.double() - expected.double()).abs().max().item()
    size = terms.double().max().item()
    assert error <= tol * max(size, 1e-30), f"{what}: max-abs error {error:.3e} > {tol:g} * sum |terms| {size:.3e}"


def make_inputs(
    seed: int,
    batch: int,
    seq_len: int,
    groups: int,
    ratio: int,
    dim_p: int,
    dim_n: int,
    a_max: float,
    with_state: bool,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Random inputs: dt in [0.05, 1.05], A in [-a_max, 0] (exactly 0 when a_max == 0), B of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    heads = groups * ratio

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "x": randn(batch, seq_len, heads, dim_p),
        "dt": 0.05 + rand(batch, seq_len, heads),
        "A": -a_max * rand(heads) if a_max else torch.zeros(heads, dtype=torch.float64),
        "B": randn(batch, seq_len, groups, dim_n) / dim_n**0.5,
        "C": randn(batch, seq_len, groups, dim_n),
    }
    if with_state:
        inputs["initial_state"] = randn(batch, heads, dim_p, dim_n)
    return {name: t.to(dtype) for name, t in inputs.items()}


def random_loss(y: torch.Tensor, state: torch.Tensor, seed: int) -> torch.Tensor:
    """A random linear function of the outputs and the final state (float64)."""
    gen = torch.Generator().manual_seed(seed + 1)
    loss = (y.double() * torch.randn(y.shape, generator=gen, dtype=torch.float64)).sum()
    return loss + (state.double() * torch.randn(state.shape, generator=gen, dtype=torch.float64)).sum()


def run_with_grads(fn, inputs: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Outputs, final state and the gradients of `random_loss` w.r.t. every input."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
    y, state = fn(**leaves)
    grads = torch.autograd.grad(random_loss(y, state, seed), list(leaves.values()))
    return {"y": y, "state": state} | {f"d{name}": grad for name, grad in zip(leaves, grads)}


def decay_gradient_terms(inputs: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """[H]: sum over (batch, step) of dt * sum |dL/dS_t * S_t|, the size of the products A's gradient adds up.

    dL/dA sums dt * <dL/dS_t, exp(dt A) S_{t-1}> over every batch row and step; written out here as a
    float64 loop, since the op does not expose its states.
    """
    x, dt, A, B, C = (inputs[name].double() for name in ("x", "dt", "A", "B", "C"))
    B, C = (t.repeat_interleave(x.shape[2] // t.shape[2], dim=2) for t in (B, C))  # [Bt, T, H, N]
    x = x.requires_grad_()
    batch, _, heads, dim_p = x.shape
    initial = inputs.get("initial_state")
    state = x.new_zeros(batch, heads, dim_p, B.shape[-1]) if initial is None else initial.double()
    states, ys = [], []
    for t in range(x.shape[1]):
        write = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # [Bt, H, P, N]
        state = state * (dt[:, t] * A).exp()[..., None, None] + write
        state.retain_grad()
        states.append(state)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    random_loss(torch.stack(ys, dim=1), state, seed).backward()
    products = torch.stack([(s.grad * s).abs().sum(dim=(-1, -2)) for s in states], dim=1)  # [Bt, T, H]
    return (dt * products).sum(dim=(0, 1)).detach()


def assert_all_close(actual, expected, inputs, seed, tol, what=""):
    """Every output, state and gradient of `run_with_grads`, with A's gradient judged by `assert_sum_close`."""
    for name in expected:
        if name == "dA" and torch.float32 in (actual[name].dtype, expected[name].dtype):
            terms = decay_gradient_terms(inputs, seed)
            assert_sum_close(actual[name], expected[name], terms, tol, f"{what}{name}")
        else:
            assert_rel_close(actual[name], expected[name], tol, f"{what}{name}")


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.integers(1, 2),
        "seq_len": st.integers(1, 300),
        "groups": st.integers(1, 2),
        "ratio": st.sampled_from([1, 2]),
        "dim_p": st.sampled_from([4, 8, 16]),
        "dim_n": st.sampled_from([4, 16]),
        "a_max": st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5.0]),
        "with_state": st.booleans(),
    }
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@given(case=cases, chunk_size=st.sampled_from([16, 32, 64]))
def test_torch_matches_reference(dtype, case, chunk_size):
    inputs = make_inputs(**case, dtype=dtype)
    expected = run_with_grads(lambda **kw: ssd(**kw, backend="reference"), inputs, case["seed"])
    actual = run_with_grads(lambda **kw: ssd(**kw, backend="torch", chunk_size=chunk_size), inputs, case["seed"])
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
    assert_all_close(actual, expected, inputs, case["seed"], TOL[dtype])


@pytest.fixture(scope="module")
def fla_naive():
    module = pytest.importorskip("fla.ops.simple_gla.naive", reason="fla-core is not installed: no fla oracle")
    return module.naive_chunk_simple_gla


@given(case=cases)
def test_matches_fla_naive_simple_gla(fla_naive, case):
    inputs = make_inputs(**case, dtype=torch.float32)

    def fla_fn(x, dt, A, B, C, initial_state=None):
        # SSD is simple GLA with q = C, k = B, v = x dt, g = A dt, scale 1; fla's state is ours transposed.
        ratio = x.shape[2] // B.shape[2]
        q, k = (t.repeat_interleave(ratio, dim=2) for t in (C, B))
        if initial_state is not None:
            initial_state = initial_state.transpose(-1, -2)
        y, state = fla_naive(
            q=q, k=k, v=x * dt[..., None], g=A * dt, initial_state=initial_state, output_final_state=True, scale=1.0
        )
        return y, state.transpose(-1, -2)

    expected = run_with_grads(fla_fn, inputs, case["seed"])
    for backend, dtype in (("torch", torch.float32), ("reference", torch.float64)):
        actual = run_with_grads(
            lambda **kw: ssd(**kw, backend=backend), {name: t.to(dtype) for name, t in inputs.items()}, case["seed"]
        )
        assert_all_close(actual, expected, inputs, case["seed"], FLA_TOL, f"{backend} {dtype} ")


@given(case=cases, split=st.floats(0.0, 1.0), chunk_size=st.sampled_from([16, 32, 64]))
def test_chunk_continuation(case, split, chunk_size):
    case = case | {"seq_len": max(case["seq_len"], 2)}
    inputs = make_inputs(**case, dtype=torch.float64)
    cut = 1 + int(split * (case["seq_len"] - 2))  # 1 <= cut < T
    y, state = ssd(**inputs, backend="torch", chunk_size=chunk_size)
    initial = inputs.pop("initial_state", None)
    A = inputs.pop("A")
    head = {name: t[:, :cut] for name, t in inputs.items()}
    tail = {name: t[:, cut:] for name, t in inputs.items()}
    y1, state1 = ssd(**head, A=A, initial_state=initial, backend="torch", chunk_size=chunk_size)
    y2, state2 = ssd(**tail, A=A, initial_state=state1, backend="torch", chunk_size=chunk_size)
    assert_rel_close(torch.cat((y1, y2), dim=1), y, TOL[torch.float64], "y")
    assert_rel_close(state2, state, TOL[torch.float64], "state")


def test_long_input_in_several_spans():
    """A sequence longer than the span of chunks the torch backend batches at once (here 16 chunks of 4)."""
    inputs = make_inputs(5, 1, 150, 2, 2, 8, 4, a_max=0.5, with_state=True, dtype=torch.float64)
    expected = run_with_grads(lambda **kw: ssd(**kw, backend="reference"), inputs, 5)
    actual = run_with_grads(lambda **kw: ssd(**kw, backend="torch", chunk_size=4), inputs, 5)
    assert_all_close(actual, expected, inputs, 5, TOL[torch.float64])


def test_decode_steps_match_one_call():
    """T = 1 calls (the single-step path) carried through the state equal one chunked call."""
    inputs = make_inputs(3, 2, 40, 2, 2, 8, 4, a_max=1.0, with_state=True, dtype=torch.float64)
    y, state = ssd(**inputs, backend="torch", chunk_size=16)
    step_state, A = inputs.pop("initial_state"), inputs.pop("A")
    steps = []
    for t in range(40):
        y_t, step_state = ssd(
            **{name: x[:, t : t + 1] for name, x in inputs.items()}, A=A, initial_state=step_state, backend="torch"
        )
        steps.append(y_t)
    assert_rel_close(torch.cat(steps, dim=1), y, TOL[torch.float64], "y")
    assert_rel_close(step_state, state, TOL[torch.float64], "state")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_and_defaults(dtype):
    inputs = make_inputs(0, 1, 5, 1, 2, 4, 4, a_max=0.5, with_state=True, dtype=dtype)
    inputs["initial_state"] = inputs["initial_state"].float()
    before = inputs["initial_state"].clone()
    y, state = ssd(**inputs)
    assert y.dtype == dtype and y.shape == (1, 5, 2, 4)
    assert state.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert state.shape == (1, 2, 4, 4)
    assert torch.equal(inputs["initial_state"], before), "the initial state must not be modified"
    explicit = ssd(**inputs, backend="torch")
    assert torch.equal(y, explicit[0]) and torch.equal(state, explicit[1]), "auto on CPU is 'torch'"


def _bad(**changes):
    inputs = make_inputs(0, 2, 5, 2, 2, 3, 4, a_max=0.5, with_state=True, dtype=torch.float32)
    return inputs | changes


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (_bad(x=torch.zeros(2, 5, 12)), ValueError, r"x must be \[Bt, T, H, P\], got \[2, 5, 12\]"),
        (_bad(dt=torch.zeros(2, 5)), ValueError, r"dt must be \[Bt, T, H\] = \[2, 5, 4\], got \[2, 5\]"),
        (_bad(A=torch.zeros(2)), ValueError, r"A must be \[H\] = \[4\], got \[2\]"),
        (_bad(B=torch.zeros(2, 5, 3, 4), C=torch.zeros(2, 5, 3, 4)), ValueError, r"H = 4 heads, not a multiple of"),
        (_bad(B=torch.zeros(2, 4, 2, 4)), ValueError, r"B must be \[Bt, T, G, N\]"),
        (_bad(C=torch.zeros(2, 5, 2, 5)), ValueError, r"C must be \[Bt, T, G, N\] = \[2, 5, 2, 4\], got \[2, 5, 2, 5"),
        (_bad(initial_state=torch.zeros(2, 4, 4, 3)), ValueError, r"initial_state must be \[Bt, H, P, N\]"),
        (_bad(dt=torch.zeros(2, 5, 4, dtype=torch.int32)), ValueError, r"dt must be a floating-point tensor"),
        (_bad(backend="cuda"), ValueError, r"unknown backend 'cuda'"),
        (_bad(backend="flash"), ValueError, r"backend 'flash' is not available"),
        (_bad(backend="fla"), ValueError, r"backend 'fla' needs CUDA tensors"),
        (_bad(chunk_size=-1), ValueError, r"chunk_size must be a positive int"),
    ],
    ids=["x-rank", "dt-rank", "A-heads", "groups", "B-length", "C-shape", "state", "int", "backend",
         "backend-for-other-op", "fla-on-cpu", "chunk-size"],
)
def test_bad_inputs_raise(kwargs, error, match):
    with pytest.raises(error, match=r"^ssd: .*" + match):
        ssd(**kwargs)


def test_empty_sequence_raises():
    inputs = make_inputs(0, 1, 1, 1, 1, 4, 4, a_max=0.5, with_state=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="T must be at least 1"):
        ssd(**{name: t[:, :0] if t.dim() > 1 else t for name, t in inputs.items()})


@pytest.mark.parametrize("backend, seq_len", [("torch", 40), ("torch", 1), ("reference", 12)])
def test_autocast_does_not_change_the_float32_computation(backend, seq_len):
    """Under bf16 autocast the op still computes in float32: outputs and state bit-identical."""
    inputs = make_inputs(2, 2, seq_len, 2, 2, 8, 4, a_max=1.0, with_state=True, dtype=torch.float32)
    expected = ssd(**inputs, backend=backend, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = ssd(**inputs, backend=backend, chunk_size=8)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == torch.float32 and torch.equal(a, e)
