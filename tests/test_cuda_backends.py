"""Every CUDA backend against the float64 reference on the GPU: outputs, final states and gradients in
float32 and bfloat16, and the conformance kit on CUDA for each mixer with its fast backend.

The oracle runs the same (already rounded) inputs upcast to float64 through backend="reference", so
only a backend's own arithmetic is measured, as a relative RMSE: ||got - oracle|| / ||oracle||.
Tolerances by input dtype (a real bug gives ratios of order 1):
- float32: fla's Triton kernels take float32 dot products in TF32 (10-bit mantissa, unit roundoff
  4.9e-4); a few units accumulate over a chunk's triangular solve and the state carried across
  chunks: 2e-3 forward, 5e-3 for gradients (longer product chains). SDPA, FlexAttention and the
  torch backend compute in true float32 and sit far below.
- bfloat16: unit roundoff 3.9e-3; rounding the outputs alone gives a ratio of about 2.3e-3, and the
  kernels round intermediates (w, u, attention probabilities) to bf16 for the tensor cores: 1e-2
  forward, 3e-2 for gradients (fla's own tests allow 2e-2 for gate gradients against a float32
  oracle, which shares part of the input rounding with the kernel).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

from mixerzoo.ops import attention, dplr_delta_rule, elementwise_recurrence, gated_delta_rule, gated_linear_attention, ssd
from mixerzoo.ops._backend import module_available
from mixerzoo.testing import certify

pytestmark = pytest.mark.cuda
DEVICE = "cuda"  # tests/test_gpu_dry_run.py runs these functions on "cpu" with the CPU backends

FORWARD_TOL = {torch.float32: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]
needs_fla = pytest.mark.skipif(not module_available("fla"), reason="fla (flash-linear-attention) is not installed")
needs_flash = pytest.mark.skipif(not module_available("flash_attn"), reason="flash-attn is not installed")
RECURRENT_BACKENDS = ["torch", pytest.param("fla", marks=needs_fla)]
# One head layout per op for every test and kit config below, so fla's Triton kernels compile and
# autotune once per dtype: grouped value heads (H = 2 key heads, HV = 4 value heads).
GDN_SHAPE = dict(batch=2, heads=2, value_heads=4, dim_k=32, dim_v=64)
SSD_SHAPE = dict(batch=2, heads=4, dim_p=16, groups=2, dim_n=32)


def assert_rel_rmse(got: torch.Tensor, oracle: torch.Tensor, tol: float, what: str) -> None:
    """Finite, same shape, and ||got - oracle|| <= tol * ||oracle|| (in float64)."""
    assert got.shape == oracle.shape, f"{what}: shape {list(got.shape)} != {list(oracle.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    error = (got.double() - oracle.double()).norm().item()
    size = oracle.double().norm().item()
    assert error <= tol * size, f"{what}: relative RMSE {error / size:.3e} > {tol:g}"


def compare(run, inputs: dict, grad_names: tuple[str, ...], dtype: torch.dtype, label: str) -> None:
    """run(**inputs) -> (out, state) against run(**float64 inputs, backend="reference"): forward without
    grad (the decode kernels), then outputs, states and the gradients of `grad_names` with grad."""
    oracle_inputs = {k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        out, state = run(**inputs)
        want_out, want_state = run(**oracle_inputs, backend="reference")
    assert_rel_rmse(out, want_out, FORWARD_TOL[dtype], f"{label}: outputs (no grad)")
    assert_rel_rmse(state, want_state, FORWARD_TOL[dtype], f"{label}: final state (no grad)")
    assert state.dtype == torch.float32, f"{label}: state dtype {state.dtype}"
    grads = []
    for args, backend in ((inputs, None), (oracle_inputs, "reference")):
        leaves = {k: v.detach().clone().requires_grad_(k in grad_names) if torch.is_tensor(v) else v
                  for k, v in args.items()}
        out, state = run(**leaves) if backend is None else run(**leaves, backend=backend)
        weights = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(7), device=DEVICE)
        loss = (out.double() * weights.double()).sum() + state.double().square().sum()
        grads.append(torch.autograd.grad(loss, [leaves[k] for k in grad_names]))
    for name, fast, ref in zip(grad_names, *grads):
        assert_rel_rmse(fast, ref, GRAD_TOL[dtype], f"{label}: d loss / d {name}")


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen, device=DEVICE)


ZOO_FORMS = ("linear", "scalar", "channel", "bonus", "deltanet", "kda", "dplr", "elementwise")


@pytest.mark.parametrize("form", ZOO_FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", RECURRENT_BACKENDS)
def test_zoo_ops(backend, dtype, form):
    """The zoo's ops in each form fla has a kernel for (linear_attn, simple_gla, gla, rwkv6, delta_rule, kda,
    dplr, hgrn), T = 100 (two chunks, not a multiple of 64) from an initial state, against the float64 reference."""
    gen, (b, t, h, k, v) = torch.Generator(DEVICE).manual_seed(3), (2, 100, 2, 32, 64)
    q = F.normalize(_randn(b, t, h, k, gen=gen), dim=-1).to(dtype)
    keys = F.normalize(_randn(b, t, h, k, gen=gen), dim=-1).to(dtype)
    values = _randn(b, t, h, v, gen=gen).to(dtype)
    scalar, channel = F.logsigmoid(_randn(b, t, h, gen=gen) + 3), F.logsigmoid(_randn(b, t, h, k, gen=gen) + 3)
    state = _randn(b, h, k, v, gen=gen)
    if form == "elementwise":
        inputs = dict(x=values.flatten(2), g=F.logsigmoid(_randn(b, t, h * v, gen=gen) + 3).to(dtype),
                      initial_state=_randn(b, h * v, gen=gen))

        def run(backend=backend, **kw):
            return elementwise_recurrence(**kw, backend=backend)

        return compare(run, inputs, ("x", "g", "initial_state"), dtype, f"elementwise_recurrence {backend}")
    inputs = dict(q=q, k=keys, v=values, initial_state=state)
    if form == "dplr":  # RWKV-7's factors: a = -kk, b = kk * rate
        removal = F.normalize(_randn(b, t, h, k, gen=gen), dim=-1)
        inputs |= dict(a=(-removal).to(dtype), b=(removal * torch.sigmoid(_randn(b, t, h, k, gen=gen))).to(dtype),
                       g=channel.to(dtype))

        def run(backend=backend, **kw):
            return dplr_delta_rule(**kw, backend=backend)
    elif form in ("deltanet", "kda"):
        inputs |= dict(g=None if form == "deltanet" else channel.to(dtype), beta=torch.sigmoid(_randn(b, t, h, gen=gen)).to(dtype))

        def run(backend=backend, **kw):
            return gated_delta_rule(**kw, backend=backend)
    else:
        inputs |= dict(g={"linear": None, "scalar": scalar, "channel": channel, "bonus": channel}[form])
        inputs["g"] = None if inputs["g"] is None else inputs["g"].to(dtype)
        if form == "bonus":
            inputs["bonus"] = 0.5 * _randn(h, k, gen=gen)

        def run(backend=backend, **kw):
            return gated_linear_attention(**kw, backend=backend)

    grads = tuple(name for name in ("q", "k", "v", "a", "b", "g", "beta", "initial_state") if inputs.get(name) is not None)
    compare(run, inputs, grads, dtype, f"{form} {backend}")

@pytest.mark.parametrize("length", [1, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", RECURRENT_BACKENDS)
def test_gated_delta_rule(backend, dtype, length):
    """Grouped value heads and an initial state; T = 100 spans two chunks (not a multiple of 64); T = 1
    without grad is fla's fused recurrent kernel, with grad its chunk kernel."""
    s, gen = GDN_SHAPE, torch.Generator(DEVICE).manual_seed(length)
    b, h, hv = s["batch"], s["heads"], s["value_heads"]
    inputs = dict(
        q=F.normalize(_randn(b, length, h, s["dim_k"], gen=gen), dim=-1).to(dtype),
        k=F.normalize(_randn(b, length, h, s["dim_k"], gen=gen), dim=-1).to(dtype),
        v=_randn(b, length, hv, s["dim_v"], gen=gen).to(dtype),
        g=F.logsigmoid(_randn(b, length, hv, gen=gen)).to(dtype),
        beta=torch.sigmoid(_randn(b, length, hv, gen=gen)).to(dtype),
        initial_state=_randn(b, hv, s["dim_k"], s["dim_v"], gen=gen),
    )

    def run(backend=backend, **kw):
        return gated_delta_rule(**kw, backend=backend)

    compare(run, inputs, ("q", "k", "v", "g", "beta", "initial_state"), dtype, f"gated_delta_rule {backend} T={length}")


@pytest.mark.parametrize("length", [1, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", RECURRENT_BACKENDS)
def test_ssd(backend, dtype, length):
    """fla's chunk_simple_gla carries SSD (q = C, k = B, v = x dt, g = A dt, state transposed); groups of B, C
    shared by 2 heads each; dt and A stay float32 as the Mamba2 mixer computes them."""
    s, gen = SSD_SHAPE, torch.Generator(DEVICE).manual_seed(length)
    b, h, g = s["batch"], s["heads"], s["groups"]
    inputs = dict(
        x=_randn(b, length, h, s["dim_p"], gen=gen).to(dtype),
        dt=F.softplus(_randn(b, length, h, gen=gen) - 2),
        A=-torch.rand(h, generator=gen, device=DEVICE) * 4 - 0.5,
        B=_randn(b, length, g, s["dim_n"], gen=gen).to(dtype),
        C=_randn(b, length, g, s["dim_n"], gen=gen).to(dtype),
        initial_state=_randn(b, h, s["dim_p"], s["dim_n"], gen=gen),
    )

    def run(backend=backend, **kw):
        return ssd(**kw, backend=backend)

    compare(run, inputs, ("x", "dt", "A", "B", "C", "initial_state"), dtype, f"ssd {backend} T={length}")


ATTENTION_BACKENDS = ["torch", "flex", pytest.param("fla", marks=needs_fla), pytest.param("flash", marks=needs_flash)]
# (Tq, Tk, Hq, Hkv, window): a full prefill with GQA, a windowed prefill, a chunk after a prefix,
# and one decode query. fla's parallel_attn has no key offset (Tq == Tk only).
ATTENTION_CASES = [(200, 200, 4, 2, None), (200, 200, 4, 2, 64), (37, 200, 4, 2, 64), (1, 200, 4, 2, None),
                   (1, 200, 4, 4, 64)]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "tq{}-tk{}-hq{}-hkv{}-w{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention(backend, dtype, case):
    tq, tk, hq, hkv, window = case
    if backend == "fla" and tq != tk:
        pytest.skip("fla's parallel_attn has no key offset: Tq must equal Tk")
    if backend == "flash" and dtype == torch.float32:
        pytest.skip("flash-attn takes float16 / bfloat16 only")
    if backend == "flex" and dtype == torch.float32:
        pytest.skip("compiled FlexAttention specialises per dtype; its bfloat16 kernels are the ones used")
    gen = torch.Generator(DEVICE).manual_seed(tq + tk)
    q = _randn(2, tq, hq, 32, gen=gen).to(dtype)
    k, v = (_randn(2, tk, hkv, 32, gen=gen).to(dtype) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    oracle_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, window, backend=backend)
    want = attention(*oracle_leaves, window, backend="reference")
    label = f"attention {backend} {case}"
    assert out.dtype == dtype
    assert_rel_rmse(out, want, FORWARD_TOL[dtype], f"{label}: outputs")
    if tq == 1:
        return  # decode: no backward
    weights = _randn(*out.shape, gen=gen)
    fast = torch.autograd.grad((out.float() * weights).sum(), leaves)
    ref = torch.autograd.grad((want * weights.double()).sum(), oracle_leaves)
    for name, a, b in zip("qkv", fast, ref):
        assert_rel_rmse(a, b, GRAD_TOL[dtype], f"{label}: d loss / d {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "flex", pytest.param("flash", marks=needs_flash)])
def test_bidirectional_attention(backend, dtype):
    if backend in ("flash", "flex") and dtype == torch.float32:
        pytest.skip(f"{backend}: bfloat16 only here (see test_attention)")
    gen = torch.Generator(DEVICE).manual_seed(3)
    q, k, v = (_randn(2, 96, 4, 32, gen=gen).to(dtype) for _ in range(3))
    want = attention(q.double(), k.double(), v.double(), causal=False, backend="reference")
    got = attention(q, k, v, causal=False, backend=backend)
    assert_rel_rmse(got, want, FORWARD_TOL[dtype], f"{backend} bidirectional")


# The kit on CUDA in float32, each mixer with backend "auto" (its fast path there: fla for the recurrent
# mixers, SDPA for attention); the shapes match the op tests above. fla's TF32 internals get 1e-2
# (elementwise, against the reference mixer; about 20 TF32 units), SDPA the kit's float32 default.
KIT_CONFIGS = {
    "gated_deltanet": ({"type": "gated_deltanet", "d_model": 64, "n_heads": 2, "head_dim": 32, "n_v_heads": 4,
                        "expand_v": 2}, 1e-2),
    "mamba2": ({"type": "mamba2", "d_model": 32, "expand": 2, "head_dim": 16, "n_groups": 2, "d_state": 32,
                "chunk_size": 64}, 1e-2),
    "attention": ({"type": "attention", "d_model": 64, "n_heads": 4, "n_kv_heads": 2}, None),
    "sliding_window": ({"type": "attention", "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "window": 8}, None),
}


@pytest.mark.parametrize("name", list(KIT_CONFIGS))
def test_conformance_kit_on_cuda(name):
    config, tolerance = KIT_CONFIGS[name]
    if config["type"] != "attention" and not module_available("fla"):
        pytest.skip("fla (flash-linear-attention) is not installed: the recurrent mixers' fast backend")
    certify(config, dtype=torch.float32, device=DEVICE, tolerance=tolerance,
            settings=settings(max_examples=4, deadline=None, derandomize=True))
