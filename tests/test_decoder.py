"""Decoder-level properties on hybrid layouts: chunking, decode, padding, far past the window, save / load."""

import pytest
import torch
from hypothesis import given, strategies as st

from mixerzoo import Decoder, LayoutSpec
from mixerzoo.blocks import STOPPED, flops_per_token, generate, parameter_count, prefill, sample, state_nbytes, stream
from mixerzoo.registry import list_recipes, recipe
from mixerzoo.testing import assert_close, assert_states_close

F64 = torch.float64
LEGEND = {
    "G": {"type": "gated_deltanet", "n_heads": 2, "head_dim": 8, "chunk_size": 8},
    "S": {"type": "attention", "n_heads": 4, "n_kv_heads": 2, "window": 4, "qkv_bias": True},
    "F": {"type": "attention", "n_heads": 4, "n_kv_heads": 1},
    "M": {"type": "mamba2", "d_state": 8, "head_dim": 8, "chunk_size": 8},
}


def hybrid(pattern: str = "GSFM", vocab: int = 40) -> Decoder:
    """A float64 decoder over `pattern` with perturbed weights."""
    spec = LayoutSpec.model_validate(
        {"d_model": 32, "vocab_size": vocab, "pattern": pattern, "legend": {k: LEGEND[k] for k in set(pattern)},
         "mlp": {"hidden": 48}}
    )
    model = Decoder(spec).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_decoder_states_close(a, b, what):
    assert torch.equal(a.seen, b.seen), f"{what}: seen {a.seen.tolist()} != {b.seen.tolist()}"
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert_states_close(x, y, f"{what}, layer {i}", F64)


@given(seed=st.integers(0, 2**31 - 1), length=st.integers(1, 40), data=st.data())
def test_chunked_prefill_equals_one_shot(seed, length, data):
    torch.manual_seed(seed)
    model = hybrid()
    ids = torch.randint(0, 40, (2, length))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, length - 1)), max_size=4))) if length > 1 else []
    with torch.no_grad():
        one, s_one = model(ids)
        state, pieces = None, []
        for a, b in zip([0, *cuts], [*cuts, length]):
            logits, state = model(ids[:, a:b], state)
            pieces.append(logits)
    assert_close(torch.cat(pieces, 1), one, "chunked logits", F64)
    assert_decoder_states_close(state, s_one, "chunked state")


@pytest.mark.parametrize("pattern", ["GSF", "SGGG", "MMMS", "F"])
def test_decoding_far_past_the_window_equals_full_forward(pattern):
    # The hybrid-cache bug class: [linear, sliding, full] crashing or drifting past the window.
    torch.manual_seed(0)
    model = hybrid(pattern)
    ids = torch.randint(0, 40, (2, 60))  # window 4: 15x past it
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model(ids[:, :5])
        steps = [logits]
        for t in range(5, 60):
            logits, state = model(ids[:, t : t + 1], state)
            steps.append(logits)
    assert_close(torch.cat(steps, 1), full, f"{pattern}: prefill + 55 decode steps vs one forward", F64)


def test_left_padded_batch_equals_each_prompt_alone():
    torch.manual_seed(1)
    model = hybrid()
    prompts = [torch.randint(1, 40, (n,)) for n in (9, 3, 6)]
    width = max(len(p) for p in prompts) + 2
    ids = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], valid[row, width - len(p):] = p, True
    batched = generate(model, ids, valid=valid, max_new_tokens=12, chunk_size=4)
    last, state = prefill(model, ids, valid=valid, chunk_size=3)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=12)
        assert torch.equal(batched[row], alone[0]), (row, batched[row].tolist(), alone[0].tolist())
        last_alone, state_alone = prefill(model, p[None])
        assert_close(last[row], last_alone[0], f"row {row} last logits", F64)
        assert_decoder_states_close(state.select([row]), state_alone, f"row {row} state")


def test_saved_state_continues_exactly_and_refuses_another_spec(tmp_path):
    torch.manual_seed(2)
    model = hybrid()
    ids = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        _, state = model(ids[:, :20])
        state.save(tmp_path / "state.safetensors", model.spec)
        loaded = model.load_state(tmp_path / "state.safetensors")
        assert torch.equal(model(ids[:, 20:], loaded)[0], model(ids[:, 20:], state)[0])
    with pytest.raises(ValueError, match="saved for another spec"):
        hybrid("GSF").load_state(tmp_path / "state.safetensors")


def test_fork_and_batch_select_concat():
    torch.manual_seed(3)
    model = hybrid()
    with torch.no_grad():
        _, state = model(torch.randint(0, 40, (3, 10)))
        fork = state.clone()
        model(torch.randint(0, 40, (3, 5)), state)
        assert_decoder_states_close(fork, state, "original after advancing a copy")
        regrouped = type(state).concat([state.select([2]), state.select([0, 1])])
        nxt = torch.randint(0, 40, (3, 4))
        a, _ = model(nxt, state)
        b, _ = model(nxt[[2, 0, 1]], regrouped)
    assert_close(b, a[[2, 0, 1]], "logits after select + concat", F64)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits).tolist() == [1]
    assert all(sample(logits, temperature=1.0, top_k=1, generator=gen).item() == 1 for _ in range(20))
    assert all(sample(logits, temperature=5.0, top_p=0.01, generator=gen).item() == 1 for _ in range(20))
    drawn = {sample(logits, temperature=1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert drawn == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, temperature=1.0, top_p=0.0)


def test_stop_tokens_end_rows_and_stream_matches_generate():
    torch.manual_seed(4)
    model = hybrid()
    ids = torch.randint(0, 40, (2, 6))
    free = generate(model, ids, max_new_tokens=10)
    stop = int(free[0, 2])
    stopped = generate(model, ids, max_new_tokens=10, stop_tokens=[stop])
    first = int((free[0] == stop).nonzero()[0])
    assert stopped[0, first] == stop and (stopped[0, first + 1:] == STOPPED).all()
    streamed = torch.stack(list(stream(model, ids, max_new_tokens=10, stop_tokens=[stop])), 1)
    assert torch.equal(streamed, stopped)


@pytest.mark.parametrize("name", list_recipes())
def test_config_costs_match_the_built_tiny_model(name):
    spec = recipe(name, "tiny")
    model = Decoder(spec)
    assert parameter_count(spec) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        _, state = model(torch.randint(0, spec.vocab_size, (2, 37)))
    assert state.nbytes == state_nbytes(spec, 37, batch_size=2, dtype=torch.float32)
    assert state.nbytes == state_nbytes(model, 37, batch_size=2)  # a model's own dtype by default


def test_flops_grow_with_context_only_for_unbounded_attention():
    assert flops_per_token(recipe("transformer", "small"), 65536) > 10 * flops_per_token(recipe("transformer", "small"), 1024)
    infinitevl = recipe("infinitevl", "small")
    assert flops_per_token(infinitevl, 65536) == flops_per_token(infinitevl, 1024)


@pytest.mark.parametrize("name", ["transformer", "infinitevl", "mamba2"])
def test_fresh_model_starts_near_uniform_predictions(name):
    # An N(0, 1) tied embedding made the first loss ~58 instead of ln(vocab) ~ 5.5.
    torch.manual_seed(0)
    spec = recipe(name, "tiny")
    ids = torch.randint(0, spec.vocab_size, (4, 64))
    with torch.no_grad():
        logits, _ = Decoder(spec)(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(spec.vocab_size * 1.0)).item()) < 0.5, loss.item()


def _every_registered_decoder_spec() -> list[tuple[str, LayoutSpec]]:
    from mixerzoo.vlm import list_vlm_recipes, vlm_recipe

    return ([(name, recipe(name, "tiny")) for name in list_recipes()]
            + [(f"vlm:{name}", vlm_recipe(name, "tiny").decoder) for name in list_vlm_recipes()])


@pytest.mark.parametrize("name, spec", _every_registered_decoder_spec(), ids=lambda v: v if isinstance(v, str) else "")
def test_generate_runs_on_every_registered_recipe(name, spec):
    """Every LM recipe and every VLM recipe's decoder (M-RoPE) generates from padded text prompts:
    the tokens are valid ids and a left-padded row equals that prompt alone (text positions)."""
    torch.manual_seed(0)
    model = Decoder(spec).eval()
    prompts = torch.randint(spec.vocab_size, (2, 6))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False
    tokens = generate(model, prompts, valid=valid, max_new_tokens=3)
    assert tokens.shape == (2, 3) and int(tokens.min()) >= 0 and int(tokens.max()) < spec.vocab_size
    assert torch.equal(tokens[1], generate(model, prompts[1:, 2:], max_new_tokens=3)[0]), name


def test_mrope_decoder_takes_text_positions_equal_in_every_section():
    """A text-only call of an M-RoPE decoder (positions None or [B, T]) equals passing the text
    positions repeated over the three sections, as Qwen2.5-VL does for text."""
    from mixerzoo.vlm import vlm_recipe

    spec = vlm_recipe("infinitevl", "tiny").decoder
    assert any(getattr(layer.mixer, "rope", None) is not None and layer.mixer.rope.kind == "mrope" for layer in spec.layers)
    model = Decoder(spec).to(F64)
    ids = torch.randint(spec.vocab_size, (2, 7))
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :3] = False
    text = valid.cumsum(1) - 1
    expected, _ = model(ids, valid=valid, positions=text.expand(3, 2, 7))
    for positions in (None, text):
        logits, _ = model(ids, valid=valid, positions=positions)
        assert torch.equal(logits, expected)
    shifted, _ = model(ids, valid=valid, positions=torch.stack([text, 2 * text, text]))
    assert not torch.allclose(shifted[valid], expected[valid])  # the sections do matter


def test_a_model_built_under_inference_mode_runs_and_equals_one_built_outside():
    """Parameters made under torch.inference_mode are inference tensors (no version counter for the
    fused-projection cache): prefill and decode still run and give the same logits."""
    spec = recipe("infinitevl", "tiny")
    torch.manual_seed(0)
    outside = Decoder(spec).eval()
    with torch.inference_mode():
        torch.manual_seed(0)
        inside = Decoder(spec).eval()
        ids = torch.randint(0, spec.vocab_size, (2, 9))
        results = []
        for model in (outside, inside):
            logits, state = model(ids)
            step, _ = model(ids[:, :1], state)
            results.append(torch.cat([logits, step], dim=1))
    assert torch.equal(*results)
