"""The step as one static program: no host sync in a decode step of any recipe (counted with our own
dispatch mode), a compiled decode equal to eager without recompiles, and the census itself."""

import unittest.mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.blocks import Decoder, compiled_step, generate, prefill
from mixerzoo.registry import list_recipes, recipe
from mixerzoo.registry.recipes import layout
from mixerzoo.testing.census import HostCensus


def test_census_counts_reads_of_device_values_and_nothing_else():
    x = torch.randn(4, 3)
    with HostCensus() as quiet:
        (x * 2 + 1).softmax(-1)
    assert quiet.syncs == 0 and quiet.calls == 3  # mul, add, softmax
    with HostCensus() as census:
        bool((x > 0).any())
        x.sum().item()
        x[x > 0]  # a boolean index: nonzero inside
        x.tolist()
    assert census.syncs == 4, census.report()
    assert all("test_static_step.py" in site for site in census.sync_sites), census.report()


def _decode_census(model: Decoder, batch: int, valid=None) -> HostCensus:
    prompt = torch.randint(model.spec.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(0))
    token = torch.randint(model.spec.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, state = model(prompt)
        _, state = model(token, state)
        with HostCensus() as census:
            model(token, state, valid=valid)
    return census


@pytest.mark.parametrize("name", list_recipes())
def test_a_decode_step_of_every_recipe_makes_no_host_sync(name):
    """All rows running (valid None), a row paused (a mask), and a static cache: zero syncs each."""
    torch.manual_seed(0)
    model = Decoder(recipe(name, "tiny")).eval()
    assert _decode_census(model, 1).syncs == 0, _decode_census(model, 1).report()
    paused = torch.tensor([[True], [False]])
    census = _decode_census(model, 2, valid=paused)
    assert census.syncs == 0, census.report()
    with torch.inference_mode():
        _, state = model(torch.randint(model.spec.vocab_size, (2, 5)))
        state = state.with_capacity(16)
        with HostCensus() as census:
            model(torch.randint(model.spec.vocab_size, (2, 1)), state, valid=paused)
    assert census.syncs == 0, census.report()


def test_decode_after_padded_prompts_agrees_with_each_row_alone_and_stays_sync_free():
    """Rows of different lengths decode through the masked path (no sync) to what each row gives alone."""
    torch.manual_seed(0)
    model = Decoder(layout("tiny", pattern="FS")).eval()
    prompts = torch.randint(256, (2, 7), generator=torch.Generator().manual_seed(2))
    valid = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.inference_mode():
        _, state = model(prompts, valid=valid)
        token = torch.tensor([[5], [9]])
        with HostCensus() as census:
            logits, _ = model(token, state)
        assert census.syncs == 0, census.report()
        for row, length in ((0, 7), (1, 3)):
            _, alone = model(prompts[row : row + 1, :length])
            want, _ = model(token[row : row + 1], alone)
            torch.testing.assert_close(logits[row], want[0], rtol=1e-5, atol=1e-5)


def test_compiled_decode_equals_eager_in_one_graph_without_recompiles():
    """Every mixer kind in one 4-layer model (full attention through its static cache, a window, GDN,
    Mamba2), compiled whole: greedy tokens equal eager and logits within float32 rounding; one graph
    for the all-running steps, whatever the context (a recompile would add a graph)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = Decoder(layout("tiny", pattern="FSGM")).eval()
    prompt = torch.randint(256, (2, 11), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = generate(model, prompt, max_new_tokens=20, compile=True)
    eager = generate(model, prompt, max_new_tokens=20)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    with torch.inference_mode():  # one step compiled and eager from the same static state (the capacity generate used)
        logits, state = prefill(model, prompt)
        token = logits.argmax(-1)[:, None]
        want, _ = model(token, state.with_capacity(11 + 20))
        got, _ = compiled_step(model)(token, state.with_capacity(11 + 20))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_is_refused_for_what_it_cannot_run():
    from mixerzoo.blocks import continue_stream

    with pytest.raises(ValueError, match="compile=True takes a Decoder or a VLM"):
        next(continue_stream(object(), torch.zeros(1, 4), None, max_new_tokens=1, compile=True))


def test_tokens_per_frame_is_what_a_frame_of_that_shape_adds():
    """A 480 x 640 frame adds 6 x 9 = 54 visual tokens at the default 224 px budget (aspect kept), a
    square one 64; the session reports what the last frame added."""
    import numpy as np

    from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

    torch.manual_seed(0)
    session = StreamSession(VLM(vlm_recipe("infinitevl", size="tiny")).eval())
    assert session.tokens_per_frame == 64 == session.tokens_for(224, 224)
    assert session.tokens_for(480, 640) == 54
    before = session.state.decoder.seen.clone()
    session.push_frames([np.zeros((480, 640, 3), dtype=np.uint8)])
    assert session.tokens_per_frame == 54
    assert int(session.state.decoder.seen[0] - before[0]) == 54 + 2  # vision start and end tokens


masks = st.lists(st.booleans(), min_size=2, max_size=2)  # one flag per row


@given(
    window=st.integers(1, 6),
    kv_heads=st.sampled_from([1, 2]),
    before=st.lists(masks, max_size=12),
    chunk=st.lists(masks, min_size=2, max_size=9),
    seed=st.integers(0, 2**16),
)
def test_the_ring_chunk_a_compiled_step_runs_equals_the_eager_one(window, kv_heads, before, chunk, seed):
    """A sliding-window chunk after a history the host does not know (what a compiled frame step runs:
    the ring and the chunk under one mask of token numbers) gives the eager outputs and ring, every
    element, whatever the window, the rows' histories and their pads. float64: exact up to rounding."""
    from mixerzoo.registry import build_mixer

    gen = torch.Generator().manual_seed(seed)
    mixer = build_mixer({"type": "attention", "d_model": 16, "n_heads": 2, "n_kv_heads": kv_heads,
                         "window": window}).double()
    state = mixer.init_state(2, dtype=torch.float64)
    if before:
        _, state = mixer(torch.randn(2, len(before), 16, generator=gen, dtype=torch.float64), state,
                         valid=torch.tensor(before).T)
    valid = torch.tensor(chunk).T  # [2, T]; all-valid chunks go without a mask
    valid = None if valid.all() else valid
    x = torch.randn(2, len(chunk), 16, generator=gen, dtype=torch.float64)
    want, want_state = mixer(x, state, valid=valid)
    with unittest.mock.patch.object(torch.compiler, "is_compiling", lambda: True):
        got, got_state = mixer(x, state, valid=valid)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name in ("k", "v", "seen"):
        torch.testing.assert_close(getattr(got_state, name), getattr(want_state, name), rtol=0, atol=0)


def test_a_stream_frame_and_a_vlm_decode_step_make_no_host_sync():
    """Frames after the first (and each answer's decode steps) read nothing back: grids stay host ints and
    M-RoPE positions are computed on the device."""
    import numpy as np

    from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

    torch.manual_seed(0)
    model = VLM(vlm_recipe("infinitevl", size="tiny")).eval()
    session = StreamSession(model, frame_size=56)
    frame = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    session.push_frames([frame])
    with HostCensus() as census:
        session.push_frames([frame])
    assert census.syncs == 0, census.report()
    with torch.inference_mode():
        logits, state = model(torch.tensor([[5, 6, 7]]), session.state.clone())
        with HostCensus() as census:
            model(logits[:, -1:].argmax(-1), state)
    assert census.syncs == 0, census.report()


def test_a_compiled_stream_runs_each_frame_size_and_each_decode_step_as_one_graph():
    """StreamSession(compile=True): frames of one size share one graph (the state's layout never changes
    it), the answers' decode steps another, and states and answers equal eager ones. The capture is
    what this tests: the program runs through aot_eager here (inductor's C++ build takes minutes on
    a CPU; its numerics are the decode test's)."""
    import functools
    import sys

    import numpy as np
    import torch._dynamo

    from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

    generate_module = sys.modules["mixerzoo.blocks.generate"]
    torch.manual_seed(0)
    model = VLM(vlm_recipe("infinitevl", size="tiny")).eval()
    frames = [np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8) for i in range(3)]
    eager = StreamSession(model, frame_size=56)
    eager.push_frames(frames)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    capture_only = functools.partial(torch.compile, backend="aot_eager")
    with unittest.mock.patch.object(generate_module.torch, "compile", capture_only):
        compiled = StreamSession(model, frame_size=56, compile=True)
        compiled.push_frames(frames)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        assert compiled.ask([5, 6, 7], max_new_tokens=4) == eager.ask([5, 6, 7], max_new_tokens=4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for got, want in zip(compiled.state.decoder.flat_tensors().values(), eager.state.decoder.flat_tensors().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled.state.rope.next_pos, eager.state.rope.next_pos)


def test_a_compiled_stream_with_full_attention_needs_and_keeps_a_capacity():
    import numpy as np

    from mixerzoo.vlm import VLM, StreamSession, vlm_recipe

    model = VLM(vlm_recipe("transformer", size="tiny")).eval()
    with pytest.raises(ValueError, match="needs capacity="):
        StreamSession(model, frame_size=56, compile=True)
    session = StreamSession(model, frame_size=56, compile=True, capacity=5)  # checked before anything compiles
    with pytest.raises(ValueError, match="frame 1 would take the stream to 6 tokens, past its capacity of 5"):
        session.push_frames([np.zeros((56, 56, 3), dtype=np.uint8)])  # 2 x 2 visual tokens + start and end


def test_canonical_state_restrides_views_without_copying_and_copies_the_rest():
    """What a compiled step's guards see: fresh strides always; a tensor whose size-1 dimensions alone
    differ stays a view of the same memory, a non-contiguous one is copied; values never change."""
    from mixerzoo.mixers.gated_deltanet import GatedDeltaNetState

    tail = torch.randn(1, 5, 8)[:, 2:]  # [1, 3, 8], stride (40, 8, 1): contiguous but not fresh
    matrix = torch.randn(2, 4, 4).transpose(1, 2)  # not contiguous
    state = GatedDeltaNetState(conv=tail, recurrent=matrix)
    made = state.canonical()
    assert made.conv.stride() == (24, 8, 1) and made.conv.data_ptr() == tail.data_ptr()
    assert made.recurrent.is_contiguous() and made.recurrent.data_ptr() != matrix.data_ptr()
    assert torch.equal(made.conv, tail) and torch.equal(made.recurrent, matrix)
    assert made.canonical() is made


def test_compiled_step_after_an_eager_prefill_compiles_once_in_its_first_steps():
    """Issue 33's report: the transformer recipe, an eager prefill, `compiled_step` over
    `state.with_capacity(64)`, four steps: one graph and no recompile (the states a step returns carry the
    guards of the first: `canonical()` restrides them alike)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = Decoder(recipe("transformer", "tiny")).eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.inference_mode():
        logits, state = prefill(model, torch.randint(256, (1, 8), generator=torch.Generator().manual_seed(4)))
        state, step = state.with_capacity(64), compiled_step(model)
        token = logits.argmax(-1)[:, None]
        for _ in range(4):
            out, state = step(token, state)
            token = out[:, -1].argmax(-1)[:, None]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["recompiles"], dict(torch._dynamo.utils.counters["recompiles"])
