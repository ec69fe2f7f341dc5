"""GraphDecoder: the static-buffer T = 1 step equals the model's eager decode (CPU, uncaptured), and
on CUDA the captured graph gives the eager tokens with no host sync per token."""

import pytest
import torch

from mixerzoo.blocks import Decoder, GraphDecoder, continue_stream, prefill
from mixerzoo.registry import recipe
from mixerzoo.vlm.recipes import with_mrope

# The constant-state recipes; infinitevl also with M-RoPE, as at paper size.
RECIPES = ["swa", "gdn", "mamba2", "infinitevl", "mamba2-swa", "infinitevl-mrope"]
# Recipes with full attention: their KV caches are preallocated (capacity=).
FULL = ["transformer", "infinitevl-full"]
STEPS = 24  # past the tiny window (16) after a 12-token prompt: the ring wraps
CAPACITY = 12 + STEPS + 3


def build(name: str, device="cpu", dtype=torch.float32) -> Decoder:
    torch.manual_seed(0)
    spec = with_mrope(recipe("infinitevl", "tiny")) if name == "infinitevl-mrope" else recipe(name, "tiny")
    return Decoder(spec).to(device=device, dtype=dtype).eval()


def eager_decode(model, logits, state, steps):
    """Greedy tokens [B, steps], the logits after the last one, and the state, through model(...) calls."""
    tokens, token = [], logits.argmax(-1)
    with torch.inference_mode():
        for _ in range(steps):
            tokens.append(token)
            step_logits, state = model(token[:, None], state)
            logits = step_logits[:, 0]
            token = logits.argmax(-1)
    return torch.stack(tokens, dim=1), logits, state


@pytest.mark.parametrize("name", RECIPES)
def test_static_buffer_step_equals_eager_decode(name):
    model = build(name)
    prompt = torch.randint(0, model.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, state = prefill(model, prompt)
    graph = GraphDecoder(model, state, capture=False)
    tokens = graph.generate(logits, STEPS)
    want_tokens, want_logits, want_state = eager_decode(model, logits, state, STEPS)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(graph.logits, want_logits)
    for key, tensor in want_state.flat_tensors().items():
        assert torch.equal(graph.state.flat_tensors()[key], tensor), key
    streamed = torch.stack(list(continue_stream(model, logits, state, max_new_tokens=STEPS)), dim=1)
    assert torch.equal(tokens, streamed)
    graph.reset(state)  # the input state was never touched: decoding again repeats the tokens
    assert torch.equal(graph.generate(logits, STEPS), tokens)


@pytest.mark.parametrize("name", FULL)
def test_static_cache_step_equals_eager_decode(name):
    """A full-attention model decodes through the static cache (in place, length-masked over all slots) to
    the eager growing cache's tokens; logits agree to float32 rounding (the masked SDPA sums over more,
    zero-weighted, slots in another order), and the caller's state is left as it was."""
    model = build(name)
    prompt = torch.randint(0, model.spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits, state = prefill(model, prompt)
    before = {k: t.clone() for k, t in state.flat_tensors().items()}
    graph = GraphDecoder(model, state, capacity=CAPACITY, capture=False)
    tokens = graph.generate(logits, STEPS)
    want_tokens, want_logits, want_state = eager_decode(model, logits, state, STEPS)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(graph.logits, want_logits, rtol=1e-5, atol=1e-5)
    for key, tensor in state.flat_tensors().items():
        assert torch.equal(tensor, before[key]), f"GraphDecoder wrote into the caller's {key}"
    for i, layer in enumerate(graph.state.layers):
        if hasattr(layer, "capacity"):
            assert layer.capacity == CAPACITY
            held = want_state.layers[i]
            torch.testing.assert_close(layer.k[:, :, : held.k.shape[2]], held.k, rtol=1e-5, atol=1e-5)
    graph.reset(state)
    assert torch.equal(graph.generate(logits, STEPS), tokens)


def test_full_attention_without_capacity_is_refused_with_the_layer_named():
    model = build("infinitevl-full")
    with pytest.raises(ValueError, match=r"layer 0 \(attention\) keeps a state that grows.*capacity=N"):
        GraphDecoder(model, model.init_state(1), capture=False)


def test_a_full_static_cache_is_an_error():
    model = build("transformer")
    logits, state = prefill(model, torch.randint(0, 256, (1, 5)))
    graph = GraphDecoder(model, state, capacity=6, capture=False)
    graph.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="static KV cache of 6 slots is full"):
        graph.step(torch.tensor([1]))


def test_reset_rejects_a_state_of_other_shapes():
    model = build("gdn")
    graph = GraphDecoder(model, model.init_state(2), capture=False)
    with pytest.raises(ValueError, match="shape"):
        graph.reset(model.init_state(1))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", RECIPES + FULL)
def test_captured_graph_decode_equals_eager_tokens_without_host_sync(name, dtype):
    model = build(name, "cuda", dtype)
    prompt = torch.randint(0, model.spec.vocab_size, (2, 12), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    logits, state = prefill(model, prompt)
    graph = GraphDecoder(model, state, capacity=CAPACITY if name in FULL else None)
    assert graph.graph is not None, "on CUDA the step is captured by default"
    torch.cuda.set_sync_debug_mode("error")  # any synchronising op in the token loop raises
    try:
        tokens = graph.generate(logits, STEPS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager_state = state.with_capacity(CAPACITY) if name in FULL else state  # the graph's cache layout
    want_tokens, want_logits, _ = eager_decode(model, logits, eager_state, STEPS)
    assert torch.equal(tokens, want_tokens)
    # Same kernels in the graph and eagerly: the logits agree to the activation dtype's rounding.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(graph.logits.float(), want_logits.float(), rtol=tol, atol=tol)
