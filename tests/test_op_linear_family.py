"""The zoo's general ops (gated_linear_attention, gated_delta_rule's DeltaNet / KDA forms,
elementwise_recurrence): chunked "torch" against the float64 reference loop, and both against
flash-linear-attention's pure-torch naive recurrences, which nobody here wrote."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.ops import dplr_delta_rule, elementwise_recurrence, gated_delta_product, gated_delta_rule, gated_linear_attention
from mixerzoo.testing import assert_rel_close

# Relative error (max |a - b| / max |b|) bounds by dtype.
# float64 reference against float64 chunked: 1e-10 (exact algebra; rounding eps64 = 1.1e-16 amplified by
#   T <= 80 steps and the triangular solve; measured <= 1e-14).
# fla's naive loops compute in float32 whatever the input: ~T * eps32 = 80 * 6e-8 = 5e-6, so ours (float32
#   chunked) are held to 2e-5 against them (measured <= 3e-6).
TOL64 = 1e-10
FLA_TOL = 2e-5

naive = pytest.importorskip("fla.ops.gla.naive", reason="flash-linear-attention (fla) is not installed: no oracle")
warnings.filterwarnings("ignore", message="Triton is not supported")
from fla.ops.delta_rule.naive import delta_rule_recurrence  # noqa: E402
from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence  # noqa: E402
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product  # noqa: E402
from fla.ops.hgrn.naive import naive_recurrent_hgrn  # noqa: E402
from fla.ops.kda.naive import naive_recurrent_kda  # noqa: E402
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn  # noqa: E402
from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6  # noqa: E402
from fla.ops.simple_gla.naive import naive_recurrent_simple_gla  # noqa: E402

shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "batch": st.integers(1, 2),
    "seq_len": st.integers(1, 80),
    "heads": st.integers(1, 3),
    "dim_k": st.sampled_from([4, 8, 16]),
    "dim_v": st.sampled_from([3, 8]),
    "chunk": st.sampled_from([4, 7, 16, 64]),
    "g_max": st.sampled_from([0.05, 1.0, 8.0]),  # weak to strong decay per step
})


def _inputs(seed, batch, seq_len, heads, dim_k, dim_v, g_max, **_):
    """float64 inputs: q, k, v, scalar and per-channel decays in [-g_max, 0], beta, u, a state."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    return dict(
        q=randn(batch, seq_len, heads, dim_k), k=F.normalize(randn(batch, seq_len, heads, dim_k), dim=-1),
        v=randn(batch, seq_len, heads, dim_v), g=-g_max * rand(batch, seq_len, heads),
        gk=-g_max * rand(batch, seq_len, heads, dim_k), beta=rand(batch, seq_len, heads),
        u=randn(heads, dim_k), state=randn(batch, heads, dim_k, dim_v),
    )


def _check(ours, oracle, tol, what):
    for name, a, b in zip(("o", "final state"), ours, oracle):
        assert torch.isfinite(a).all(), f"{what}: {name} is not finite"
        err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)
        print(f"{what} {name}: relative error {err.item():.2e}")
        assert_rel_close(a.double(), b.double(), tol, what=f"{what} {name}")


def _both(op, kwargs, oracle, what, chunk):
    """float64 chunked == float64 reference; float32 chunked == fla's naive (float32) oracle."""
    ref = op(**kwargs, backend="reference")
    _check(op(**kwargs, backend="torch", chunk_size=chunk), ref, TOL64, f"{what} float64 torch vs reference")
    low = {n: (t.float() if isinstance(t, torch.Tensor) else t) for n, t in kwargs.items()}
    _check(op(**low, backend="torch", chunk_size=chunk), oracle, FLA_TOL, f"{what} float32 torch vs fla")
    _check(ref, oracle, FLA_TOL, f"{what} reference vs fla")


def _f32(*tensors):
    return [t.float() for t in tensors]


def _head_first(*tensors):
    return [t.transpose(1, 2).float() for t in tensors]


@given(shapes)
def test_linear_attention_equals_fla(s):
    x = _inputs(**s)
    oracle = naive_recurrent_linear_attn(*_f32(x["q"], x["k"], x["v"]), initial_state=x["state"].float(),
                                         output_final_state=True)
    _both(gated_linear_attention, dict(q=x["q"], k=x["k"], v=x["v"], initial_state=x["state"]), oracle,
          "linear attention", s["chunk"])


@given(shapes)
def test_scalar_decay_equals_fla_simple_gla(s):
    x = _inputs(**s)
    oracle = naive_recurrent_simple_gla(*_f32(x["q"], x["k"], x["v"], x["g"]), initial_state=x["state"].float())
    _both(gated_linear_attention, dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"], initial_state=x["state"]), oracle,
          "simple gla", s["chunk"])


@given(shapes)
def test_channel_decay_equals_fla_gla(s):
    x = _inputs(**s)
    oracle = naive.naive_recurrent_gla(*_f32(x["q"], x["k"], x["v"], x["gk"]), initial_state=x["state"].float(),
                                       output_final_state=True)
    _both(gated_linear_attention, dict(q=x["q"], k=x["k"], v=x["v"], g=x["gk"], initial_state=x["state"]), oracle,
          "gla", s["chunk"])


@given(shapes)
def test_bonus_equals_fla_rwkv6(s):
    x = _inputs(**s)
    o, state = naive_recurrent_rwkv6(*_head_first(x["q"], x["k"], x["v"], x["gk"]), x["u"].float(),
                                     initial_state=x["state"].float(), output_final_state=True)
    _both(gated_linear_attention, dict(q=x["q"], k=x["k"], v=x["v"], g=x["gk"], bonus=x["u"], initial_state=x["state"]),
          (o.transpose(1, 2), state), "rwkv6", s["chunk"])


@given(shapes)
def test_delta_rule_without_decay_equals_fla_deltanet(s):
    x = _inputs(**s)
    o, state = delta_rule_recurrence(*_head_first(x["q"], x["k"], x["v"], x["beta"]), initial_state=x["state"].float())
    _both(gated_delta_rule, dict(q=x["q"], k=x["k"], v=x["v"], g=None, beta=x["beta"], initial_state=x["state"]),
          (o.transpose(1, 2), state), "deltanet", s["chunk"])


@given(shapes, st.sampled_from([1, 2]))
def test_delta_rule_with_channel_decay_equals_fla_kda(s, group):
    x = _inputs(**s)
    v, gk, beta = (x[name].repeat_interleave(group, dim=2) for name in ("v", "gk", "beta"))  # value heads
    state = x["state"].repeat_interleave(group, dim=1)
    oracle = naive_recurrent_kda(*_f32(x["q"], x["k"], v, gk, beta), initial_state=state.float(),
                                 output_final_state=True)
    _both(gated_delta_rule, dict(q=x["q"], k=x["k"], v=v, g=gk, beta=beta, initial_state=state), oracle,
          f"kda (value heads x{group})", s["chunk"])


@given(shapes, st.integers(1, 3))
def test_gated_delta_product_equals_fla(s, householder):
    x = _inputs(**s)
    sub = {name: x[name].repeat_interleave(householder, dim=1) for name in ("k", "v", "beta")}  # [B, T n, ...]
    noise = torch.randn(sub["k"].shape, generator=torch.Generator().manual_seed(s["seed"]), dtype=torch.float64)
    sub["k"] = F.normalize(sub["k"] + 0.3 * noise, dim=-1)  # the sub-steps' keys differ
    oracle = naive_recurrent_gated_delta_product(
        *_f32(x["q"], sub["k"], sub["v"], x["g"], sub["beta"]), scale=s["dim_k"] ** -0.5,
        initial_state=x["state"].float(), output_final_state=True, num_householder=householder)

    def op(**kw):
        return gated_delta_product(**kw, num_householder=householder)

    _both(op, dict(q=x["q"], k=sub["k"], v=sub["v"], g=x["g"], beta=sub["beta"], initial_state=x["state"]), oracle,
          f"gated deltaproduct (n = {householder})", s["chunk"])


@given(shapes, st.sampled_from([1, 2]))
def test_dplr_delta_rule_equals_fla_dplr(s, group):
    """RWKV-7's form: a = -kk, b = kk * gate for a unit key kk, so the transition D + b a^T is a contraction."""
    x = _inputs(**s)
    gen = torch.Generator().manual_seed(s["seed"] + 1)
    kk = F.normalize(torch.randn(x["k"].shape, generator=gen, dtype=torch.float64), dim=-1)
    a, b = -kk, kk * torch.rand(kk.shape, generator=gen, dtype=torch.float64)
    v, gk = (x[name].repeat_interleave(group, dim=2) for name in ("v", "gk"))  # value heads
    state = x["state"].repeat_interleave(group, dim=1)
    keyed = [t.repeat_interleave(group, dim=2) for t in (x["q"], x["k"], a, b)]
    o, final = dplr_recurrence(*_head_first(*keyed[:2], v, *keyed[2:], gk), initial_state=state.float())
    _both(dplr_delta_rule, dict(q=x["q"], k=x["k"], v=v, a=a, b=b, g=gk, initial_state=state),
          (o.transpose(1, 2), final), f"dplr (value heads x{group})", s["chunk"])


@given(shapes)
def test_dplr_delta_rule_holds_the_gated_delta_rule(s):
    """With a scalar decay, a_t = -beta_t exp(g_t) k_t, b_t = k_t and values beta_t v_t, the DPLR transition
    is the gated delta rule's (I - beta k k^T) D_t and its write beta k v^T: an independent algebraic check."""
    x = _inputs(**s)
    beta = x["beta"][..., None]
    a = -beta * x["g"].exp()[..., None] * x["k"]
    dplr = dplr_delta_rule(x["q"], x["k"], beta * x["v"], a, x["k"], x["g"], initial_state=x["state"],
                           chunk_size=s["chunk"])
    delta = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["state"], backend="reference")
    _check(dplr, delta, TOL64, "dplr (a = -beta exp(g) k, b = k) vs gated delta rule")


@given(shapes)
def test_elementwise_recurrence_equals_fla_hgrn(s):
    x = _inputs(**s)
    inputs, log_decay = x["v"].flatten(2), -s["g_max"] * x["v"].flatten(2).sigmoid()
    start = x["state"][:, 0, 0].repeat(1, inputs.shape[-1] // x["state"].shape[-1] + 1)[:, : inputs.shape[-1]]
    oracle = naive_recurrent_hgrn(*_f32(inputs, log_decay), initial_state=start.float(), output_final_state=True)
    _both(elementwise_recurrence, dict(x=inputs, g=log_decay, initial_state=start), oracle, "hgrn", s["chunk"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: gated_linear_attention(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 5),
                                        torch.zeros(1, 3, 2, 3)), r"g must be \[B, T, HV\] = \[1, 3, 2\]"),
        (lambda: gated_linear_attention(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 5),
                                        bonus=torch.zeros(2, 5)), r"bonus must be \[HV, K\] = \[2, 4\]"),
        (lambda: elementwise_recurrence(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5)), r"g must be \[B, T, D\]"),
        (lambda: gated_delta_rule(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 5),
                                  torch.zeros(1, 3, 2, 5), torch.zeros(1, 3, 2)), r"per-channel decay"),
    ],
    ids=["gla-decay-shape", "bonus-shape", "elementwise-decay-shape", "kda-decay-shape"],
)
def test_bad_inputs_name_the_tensor(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _gradients(op, inputs: dict, seed: int) -> list[torch.Tensor]:
    """The outputs and every input's gradient under a random linear loss on (o, final state)."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in inputs.items()}
    o, state = op(**leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (
        state * torch.randn(state.shape, generator=gen, dtype=state.dtype)).sum()
    return [o, state, *torch.autograd.grad(loss, list(leaves.values()))]


@given(shapes, st.sampled_from(["gla", "rwkv6", "kda", "dplr", "elementwise"]))
def test_chunked_gradients_equal_the_reference_loop(s, family):
    """Gradients through the chunked per-channel forms (their decay tables, solves, scans and carries) equal
    the float64 loop's, every input's: the bug class of an in-place op autograd needs."""
    x = _inputs(**s)
    kk = F.normalize(x["q"], dim=-1)
    op, inputs = {
        "gla": (gated_linear_attention, dict(q=x["q"], k=x["k"], v=x["v"], g=x["gk"], initial_state=x["state"])),
        "rwkv6": (gated_linear_attention, dict(q=x["q"], k=x["k"], v=x["v"], g=x["gk"], bonus=x["u"],
                                               initial_state=x["state"])),
        "kda": (gated_delta_rule, dict(q=x["q"], k=x["k"], v=x["v"], g=x["gk"], beta=x["beta"],
                                       initial_state=x["state"])),
        "dplr": (dplr_delta_rule, dict(q=x["q"], k=x["k"], v=x["v"], a=-kk, b=kk * x["beta"][..., None],
                                       g=x["gk"], initial_state=x["state"])),
        "elementwise": (elementwise_recurrence, dict(x=x["v"].flatten(2), g=x["gk"][..., :1].expand_as(x["v"]).flatten(2),
                                                     initial_state=x["state"][..., 0, :].flatten(1))),
    }[family]
    ours = _gradients(lambda **kw: op(**kw, backend="torch", chunk_size=s["chunk"]), inputs, s["seed"])
    reference = _gradients(lambda **kw: op(**kw, backend="reference"), inputs, s["seed"])
    names = ["o", "final state", *(f"d{n}" for n in inputs)]
    for name, a, b in zip(names, ours, reference):
        assert_rel_close(a, b, TOL64, f"{family} {name}")
