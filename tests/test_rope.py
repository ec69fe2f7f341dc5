"""Rotary embeddings: 1-D RoPE and M-RoPE against their defining properties and a naive form."""

import torch
from hypothesis import given, strategies as st

from mixerzoo.ops import apply_rotary, rotary_angles


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(seed=st.integers(0, 2**31 - 1), shift=st.integers(-50, 50), half=st.integers(1, 16))
def test_rope_scores_depend_only_on_relative_position(seed, shift, half):
    head_dim = 2 * half
    q, k = _rand(1, 1, 1, head_dim, seed=seed), _rand(1, 1, 1, head_dim, seed=seed + 1)
    p = torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(seed))

    def score(pq, pk):
        rq = apply_rotary(q, rotary_angles(torch.tensor([[pq]]), head_dim, theta=10000.0))
        rk = apply_rotary(k, rotary_angles(torch.tensor([[pk]]), head_dim, theta=10000.0))
        return (rq * rk).sum()

    a, b = int(p[0]) + 60, int(p[1]) + 60
    torch.testing.assert_close(score(a, b), score(a + shift, b + shift), rtol=1e-9, atol=1e-9)
    rq = apply_rotary(q, rotary_angles(torch.tensor([[a]]), head_dim, theta=10000.0))
    torch.testing.assert_close(rq.norm(), q.norm(), rtol=1e-12, atol=0)


def test_rope_matches_pairwise_complex_rotation():
    x = _rand(2, 5, 3, 8, seed=0)
    positions = torch.arange(10).reshape(2, 5) * 7
    got = apply_rotary(x, rotary_angles(positions, 8, theta=500.0))
    inv_freq = 500.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.polar(torch.ones(4, dtype=torch.float64),
                                                           positions[..., None, None] * inv_freq)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-12, atol=1e-12)


def test_mrope_with_equal_streams_is_rope():
    positions = torch.randint(0, 100, (2, 6))
    sections = (2, 3, 3)
    mrope = rotary_angles(positions.expand(3, -1, -1), 16, theta=1e6, sections=sections)
    torch.testing.assert_close(mrope, rotary_angles(positions, 16, theta=1e6))


def test_mrope_follows_qwen2_5_vl_section_rule():
    # Qwen2.5-VL: cos/sin of width head_dim are split into sections * 2 and chunk i takes
    # stream i % 3; on the first half that is: frequency f uses the stream whose section holds f.
    head_dim, sections = 16, (2, 3, 3)
    positions = torch.randint(0, 1000, (3, 1, 4))
    angles = rotary_angles(positions, head_dim, theta=1e4, sections=sections)
    per_stream = [rotary_angles(positions[s], head_dim, theta=1e4) for s in range(3)]
    doubled = [torch.cat([a, a], dim=-1) for a in per_stream]
    chunks = torch.split(torch.stack(doubled), list(sections) * 2, dim=-1)
    expected = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    torch.testing.assert_close(torch.cat([angles, angles], dim=-1), expected)
