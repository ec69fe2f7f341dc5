"""The state protocol: nbytes, clone, to, select / concat, and safetensors save / load."""

import dataclasses
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mixerzoo.mixers import KVCache, MixerState, RingKVCache
from mixerzoo.registry import build_mixer

FULL = {"type": "attention", "d_model": 16, "n_heads": 2}
SWA = {**FULL, "window": 4}


@dataclasses.dataclass
class _PinnedState(MixerState):
    conv: torch.Tensor  # [B, 3, C]: activation dtype
    matrix: torch.Tensor = dataclasses.field(metadata={"float32": True})  # [B, K, V]: always float32


def test_to_converts_activation_tensors_and_keeps_pinned_float32():
    state = _PinnedState(conv=torch.randn(2, 3, 4), matrix=torch.randn(2, 4, 4))
    moved = state.to(dtype=torch.bfloat16)
    assert moved.conv.dtype == torch.bfloat16 and moved.matrix.dtype == torch.float32
    assert state.conv.dtype == torch.float32, "to() must not modify the original"
    assert moved.nbytes == 2 * 3 * 4 * 2 + 2 * 4 * 4 * 4


def _ragged_full_state(mixer):
    """Two rows that saw 5 and 2 valid tokens."""
    valid = torch.tensor([[True] * 5, [False, True, False, True, False]])
    _, state = mixer(torch.randn(2, 5, 16), valid=valid)
    return state


def test_select_trims_a_full_cache_and_concat_restores_it():
    mixer = build_mixer(FULL)
    state = _ragged_full_state(mixer)
    assert state.seen.tolist() == [5, 2] and state.k.shape[2] == 5
    short = state.select([1])
    assert short.k.shape[2] == 2 and short.seen.tolist() == [2]
    assert torch.equal(short.k[0], state.k[1, :, :2])
    again = KVCache.concat([state.select([0]), short])
    for name, tensor in state.tensors().items():
        assert torch.equal(again.tensors()[name], tensor), name
    swapped = KVCache.concat([short, state.select([0])])
    assert swapped.seen.tolist() == [2, 5] and torch.equal(swapped.k[1], state.k[0])


def test_concat_refuses_mixed_kinds_and_empty():
    full, ring = build_mixer(FULL).init_state(1), build_mixer(SWA).init_state(1)
    with pytest.raises(TypeError, match="different kinds"):
        MixerState.concat([full, ring])
    with pytest.raises(ValueError, match="at least one"):
        RingKVCache.concat([])


def test_batched_streams_continue_like_separate_ones():
    mixer = build_mixer(SWA).double()
    a, b, more = torch.randn(1, 7, 16, dtype=torch.float64), torch.randn(1, 3, 16, dtype=torch.float64), torch.randn(2, 4, 16, dtype=torch.float64)
    _, sa = mixer(a)
    _, sb = mixer(b)
    y_batched, _ = mixer(more, RingKVCache.concat([sa, sb]))
    torch.testing.assert_close(y_batched[:1], mixer(more[:1], sa)[0])
    torch.testing.assert_close(y_batched[1:], mixer(more[1:], sb)[0])


def test_save_refuses_another_config_and_foreign_files(tmp_path: Path):
    mixer = build_mixer(SWA)
    _, state = mixer(torch.randn(1, 3, 16))
    path = tmp_path / "s.safetensors"
    state.save(path, mixer.config)
    with pytest.raises(ValueError, match="window"):
        build_mixer({**SWA, "window": 8}).load_state(path)
    with pytest.raises(ValueError, match="holds a RingKVCache, not a KVCache"):
        build_mixer(FULL).load_state(path)
    build_mixer({**SWA, "backend": "reference"}).load_state(path)  # backends share the state layout
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"k": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a mixerzoo state file"):
        mixer.load_state(foreign)


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path: Path, monkeypatch):
    mixer = build_mixer(SWA)
    _, state = mixer(torch.randn(1, 3, 16))
    path = tmp_path / "s.safetensors"
    state.save(path, mixer.config)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("mixerzoo.mixers.base.save_file", crash)
    _, newer = mixer(torch.randn(1, 5, 16), state)
    with pytest.raises(OSError, match="disk full"):
        newer.save(path, mixer.config)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"], "temporary file left behind"


def test_state_size_formula_bounded_for_window_linear_for_full():
    swa, full = build_mixer(SWA).config, build_mixer(FULL).config
    assert swa.state_nbytes(10, 2) == swa.state_nbytes(1_000_000, 2)
    assert full.state_nbytes(2000, 2) - full.state_nbytes(1000, 2) == full.state_nbytes(1000, 2) - full.state_nbytes(0, 2)
    assert full.state_nbytes(1000, 1, dtype=torch.bfloat16) == 2 * 1000 * 2 * 8 * 2 + 8


def _decode(mixer, state, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        _, state = mixer(torch.randn(state.batch_size, 1, 16, generator=gen), state)
    return state


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_full_cache_decodes_into_spare_capacity_with_geometric_growth(mode):
    mixer = build_mixer(FULL)
    _, state = mixer(torch.randn(2, 3, 16))
    buffers = set()
    with mode():
        for _ in range(300):
            state = _decode(mixer, state, 1)
            buffers.add(state.k.data_ptr())  # a prefix view starts where its buffer starts
    # 1.5x growth from 64 slots: 64 -> 96+ -> ... reaches 303 tokens in a handful of buffers, not 300 copies
    assert len(buffers) <= 6, f"{len(buffers)} buffers for 300 decode steps: the cache is copied per token"
    assert state.k.shape == (2, 2, 303, 8) and state.seen.tolist() == [303, 303]
    assert state.nbytes == mixer.config.state_nbytes(303, 2)
    assert state.nbytes < state.reserved_nbytes <= 2 * state.nbytes + 2 * mixer.config.state_nbytes(64, 2)


def test_full_cache_continuations_of_one_state_never_clobber_each_other():
    mixer = build_mixer(FULL).double()
    _, state = mixer(torch.randn(1, 5, 16, dtype=torch.float64))
    snapshot = {k: t.clone() for k, t in state.tensors().items()}
    a, b = torch.randn(1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        _, after_a = mixer(a, state)  # claims the slot past the end of state's buffer
        _, after_b = mixer(b, state)  # must not write into that slot
        for name, tensor in state.tensors().items():
            assert torch.equal(tensor, snapshot[name]), f"a forward changed its input state's {name!r}"
        torch.testing.assert_close(mixer(a, after_a)[0], mixer(a, _decode_like(mixer, state, a))[0], rtol=0, atol=0)
        torch.testing.assert_close(mixer(b, after_b)[0], mixer(b, _decode_like(mixer, state, b))[0], rtol=0, atol=0)
    assert not torch.equal(after_a.k[:, :, -1], after_b.k[:, :, -1])


def _decode_like(mixer, state, x):
    """The state after x from an independent copy of `state` (no shared buffer)."""
    return mixer(x, state.clone())[1]


def test_full_cache_save_writes_the_used_length_only(tmp_path: Path):
    mixer = build_mixer(FULL)
    _, state = mixer(torch.randn(1, 4, 16))
    state = _decode(mixer, state, 3)
    assert state.reserved_nbytes > state.nbytes
    path = tmp_path / "s.safetensors"
    state.save(path, mixer.config)
    saved = safetensors.torch.load_file(path)
    assert saved["k"].shape == (1, 2, 7, 8) and saved["v"].shape == (1, 2, 7, 8)
    loaded = mixer.load_state(path)
    assert loaded.nbytes == state.nbytes == mixer.config.state_nbytes(7, 1)


@pytest.mark.parametrize("spec", [SWA, {"type": "gated_deltanet", "d_model": 16, "n_heads": 2, "head_dim": 8}])
def test_a_state_file_holding_non_finite_values_is_refused_naming_the_tensor(tmp_path, spec):
    mixer = build_mixer(spec)
    _, state = mixer(torch.randn(1, 3, 16))
    path = tmp_path / "state.safetensors"
    state.save(path, mixer.config)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=f"tensor '{name}' holds 1 non-finite value"):
        mixer.load_state(path)


def test_a_decoder_state_file_holding_inf_is_refused(tmp_path):
    from mixerzoo.blocks import Decoder
    from mixerzoo.registry import recipe

    model = Decoder(recipe("infinitevl", "tiny"))
    _, state = model(torch.randint(256, (1, 5)))
    path = tmp_path / "decoder.safetensors"
    state.save(path, model.spec)
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k, t in tensors.items() if t.is_floating_point())[-1]
    tensors[name].view(-1)[-1] = float("inf")
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=f"tensor '{name}' holds 1 non-finite value"):
        model.load_state(path)
