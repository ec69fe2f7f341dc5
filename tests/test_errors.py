"""Bad input raises a clear error naming what is wrong."""

import pytest
import torch
from pydantic import ValidationError

from mixerzoo.registry import build_mixer

SPEC = {"type": "attention", "d_model": 16, "n_heads": 2, "window": 4}


@pytest.mark.parametrize(
    "spec, message",
    [
        ({**SPEC, "window": 0}, "window must be >= 1"),
        ({**SPEC, "n_heads": 3}, r"n_heads \(3\) does not divide d_model \(16\)"),
        ({**SPEC, "n_heads": 4, "n_kv_heads": 3}, r"multiple of n_kv_heads \(3\)"),
        ({**SPEC, "windw": 4}, "windw"),
        ({**SPEC, "rope": {"kind": "mrope"}}, "sections is required"),
        ({**SPEC, "rope": {"kind": "mrope", "sections": [1, 1, 1]}}, "must sum to head_dim // 2 = 4"),
        ({**SPEC, "d_model": 0}, "d_model"),
    ],
)
def test_bad_configs_name_the_field(spec, message):
    with pytest.raises(ValidationError, match=message):
        build_mixer(spec)


def test_unknown_mixer_type_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown mixer type 'attn'.*attention"):
        build_mixer({"type": "attn", "d_model": 16})


@pytest.fixture
def mixer():
    return build_mixer(SPEC)


def test_wrong_rank(mixer):
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model\], got shape \[5, 16\]"):
        mixer(torch.randn(5, 16))


def test_wrong_d_model(mixer):
    with pytest.raises(ValueError, match="x has d_model 8, the config says 16"):
        mixer(torch.randn(1, 5, 8))


def test_batch_mismatch_between_x_and_state(mixer):
    _, state = mixer(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="x has batch 3 but the state has 2 rows"):
        mixer(torch.randn(3, 1, 16), state)


def test_state_from_another_config(mixer):
    _, other = build_mixer({**SPEC, "window": 8})(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match=r"state field 'k' has shape \[1, 2, 8, 8\].*needs \[1, 2, 4, 8\]"):
        mixer(torch.randn(1, 1, 16), other)
    _, full = build_mixer({**SPEC, "window": None})(torch.randn(1, 3, 16))
    with pytest.raises(TypeError, match="expected a RingKVCache, got a KVCache"):
        mixer(torch.randn(1, 1, 16), full)


def test_bad_valid_and_positions(mixer):
    with pytest.raises(ValueError, match=r"valid must be a bool tensor \[1, 3\]"):
        mixer(torch.randn(1, 3, 16), valid=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"positions must have shape \[1, 3\]"):
        mixer(torch.randn(1, 3, 16), positions=torch.zeros(3, 1, 3, dtype=torch.long))
