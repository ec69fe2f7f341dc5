"""Mamba2: the conformance kit, mamba_ssm's parameter layout, a naive loop reference, config errors."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from mixerzoo.mixers import Mamba2, Mamba2Config, Mamba2State
from mixerzoo.registry import build_mixer
from mixerzoo.testing import build_pair, certify

SMALL = {"type": "mamba2", "d_model": 16, "d_state": 8, "head_dim": 8, "expand": 2, "chunk_size": 4}
MAMBA2_CONFIGS = {
    "g1-chunk4": SMALL,
    "g2-chunk8-conv2-nobias-dtlimit": {
        **SMALL, "head_dim": 4, "n_groups": 2, "chunk_size": 8, "d_conv": 2, "conv_bias": False,
        "dt_limit": (0.01, 0.5),
    },
    # Falcon-H1's forms: a width that is not expand x d_model, the norm before the gate, or no norm at all
    "d_ssm16-g2-norm-before-gate": {**SMALL, "d_ssm": 16, "n_groups": 2, "gate_norm": "before_gate"},
    "no-gate-norm": {**SMALL, "gate_norm": "none"},
}


@pytest.mark.parametrize("name", list(MAMBA2_CONFIGS))
def test_mamba2_passes_the_kit_float64(name):
    certify(MAMBA2_CONFIGS[name])


def test_mamba2_passes_the_kit_float32():
    certify({**SMALL, "n_groups": 2}, dtype=torch.float32)


def test_parameters_are_named_and_shaped_as_mamba_ssm():
    mixer = build_mixer({**SMALL, "n_groups": 2})
    assert isinstance(mixer, Mamba2)
    # d_inner 32, H 4, P 8, G 2, N 8: conv channels 32 + 2*2*8 = 64; in_proj 2*32 + 2*2*8 + 4 = 100
    expected = {
        "in_proj.weight": (100, 16),
        "conv1d.weight": (64, 1, 4),
        "conv1d.bias": (64,),
        "dt_bias": (4,),
        "A_log": (4,),
        "D": (4,),
        "norm.weight": (32,),
        "out_proj.weight": (16, 32),
    }
    assert {n: tuple(p.shape) for n, p in mixer.named_parameters()} == expected
    no_bias = build_mixer({**SMALL, "conv_bias": False})
    assert "conv1d.bias" not in dict(no_bias.named_parameters())


def test_init_follows_mamba_ssm():
    config = Mamba2Config(d_model=64, d_state=8, head_dim=4)  # 32 heads
    mixer = Mamba2(config)
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= config.dt_min * (1 - 1e-5) and dt.max() <= config.dt_max * (1 + 1e-5)
    A = -mixer.A_log.exp()
    assert A.min() >= -16 * (1 + 1e-5) and A.max() <= -1 * (1 - 1e-5)
    assert torch.equal(mixer.D, torch.ones(32)) and torch.equal(mixer.norm.weight, torch.ones(128))


def _naive_mamba2(mixer: Mamba2, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mamba_ssm's Mamba2 forward as a plain loop over time from a zero state: (y, conv tail, ssm state)."""
    c = mixer.config
    batch, length, _ = x.shape
    H, P, N, G = c.n_heads, c.head_dim, c.d_state, c.n_groups
    zxbcdt = x @ mixer.in_proj.weight.T  # [B, T, 2*d_inner + 2*G*N + H]
    z, xBC_in, dt = zxbcdt[..., : c.d_inner], zxbcdt[..., c.d_inner : -H], zxbcdt[..., -H:]
    conv = F.conv1d(xBC_in.transpose(1, 2), mixer.conv1d.weight, mixer.conv1d.bias, padding=c.d_conv - 1,
                    groups=c.conv_channels)
    xBC = F.silu(conv[..., :length].transpose(1, 2))
    xs = xBC[..., : c.d_inner].reshape(batch, length, H, P)
    Bg = xBC[..., c.d_inner : c.d_inner + G * N].reshape(batch, length, G, N).repeat_interleave(H // G, dim=2)
    Cg = xBC[..., c.d_inner + G * N :].reshape(batch, length, G, N).repeat_interleave(H // G, dim=2)
    dt = F.softplus(dt + mixer.dt_bias).clamp(*c.dt_limit)  # [B, T, H]
    A = -mixer.A_log.exp()
    S = x.new_zeros(batch, H, P, N)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        S = decay * S + dt[:, t, :, None, None] * xs[:, t, :, :, None] * Bg[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Cg[:, t]) + mixer.D[:, None] * xs[:, t])
    y = torch.stack(ys, dim=1).reshape(batch, length, c.d_inner)
    if c.gate_norm != "before_gate":
        y = y * F.silu(z)
    if c.gate_norm != "none":
        y = y.reshape(batch, length, G, -1)
        y = y / torch.sqrt(y.square().mean(-1, keepdim=True) + c.norm_eps)
        y = y.reshape(batch, length, c.d_inner) * mixer.norm.weight
    if c.gate_norm == "before_gate":
        y = y * F.silu(z)
    return y @ mixer.out_proj.weight.T, xBC_in[:, length - (c.d_conv - 1) :], S


@pytest.mark.parametrize("name", list(MAMBA2_CONFIGS))
def test_forward_equals_a_naive_loop_of_mamba_ssms_equations(name):
    config = Mamba2Config.model_validate(MAMBA2_CONFIGS[name])
    mixer, _ = build_pair(config, torch.float64, seed=0)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = mixer(x)
        y_naive, conv_naive, ssm_naive = _naive_mamba2(mixer, x)
    torch.testing.assert_close(y, y_naive, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state.conv, conv_naive, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state.ssm, ssm_naive, rtol=1e-9, atol=1e-9)


def test_state_dtypes_follow_the_activations():
    mixer = build_mixer(SMALL)
    assert mixer.init_state(1, dtype=torch.float64).ssm.dtype == torch.float64
    low = mixer.to(torch.bfloat16)
    y, state = low(torch.randn(2, 6, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state.conv.dtype == torch.bfloat16 and state.ssm.dtype == torch.float32
    assert state.nbytes == low.config.state_nbytes(6, 2, dtype=torch.bfloat16)
    assert isinstance(state, Mamba2State)


def test_state_bytes_are_constant_in_tokens():
    config = Mamba2Config.model_validate(SMALL)
    # conv tail 3 x 48 channels (activation dtype) + SSM state 4 heads x 8 x 8 (float32), per row
    per_row = 3 * 48 * 4 + 4 * 8 * 8 * 4
    assert {config.state_nbytes(n, 2) for n in (0, 1, 7, 10**6)} == {2 * per_row}
    assert config.state_nbytes(5, 1, dtype=torch.float64) == 3 * 48 * 8 + 4 * 8 * 8 * 8
    mixer = build_mixer(config)
    state = mixer.init_state(2)
    for n in (5, 11):
        _, state = mixer(torch.randn(2, n, 16), state)
        assert state.nbytes == 2 * per_row


@pytest.mark.parametrize(
    "update, message",
    [
        ({"head_dim": 12}, r"head_dim \(12\) must divide d_inner = expand \* d_model = 32"),
        ({"n_groups": 3}, r"n_groups \(3\) must divide the number of heads d_inner // head_dim = 4"),
        ({"dt_min": 0.2}, r"dt_min \(0.2\) must be <= dt_max \(0.1\)"),
        ({"dt_limit": (0.5, 0.1)}, "dt_limit must be"),
        ({"A_init_range": (0, 16)}, "A_init_range must be"),
        ({"backend": "flash"}, "backend 'flash' has no SSD kernel"),
        ({"backend": "fla", "chunk_size": 6}, "power-of-two chunk_size, got 6"),
        ({"d_state": 0}, "d_state"),
        ({"dstate": 8}, "dstate"),
    ],
)
def test_bad_configs_name_the_field(update, message):
    with pytest.raises(ValidationError, match=message):
        build_mixer({**SMALL, **update})
