"""Packed sequences: PackedLayout, each mixer's forward_packed, and Decoder / VLM rows of several
documents equal each document alone. Tolerances: float64, the packed and separate runs differ only
in summation order, so the kit's 1e-9 (mixerzoo.testing.TOLERANCES) applies throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixerzoo as mz
from mixerzoo.blocks import Decoder
from mixerzoo.mixers.packing import PackedLayout
from mixerzoo.registry import build_mixer
from mixerzoo.testing import assert_close, certify
from mixerzoo.vlm import VLM, expand_vision_tokens, process_images, vlm_recipe

rows_of_documents = st.lists(st.lists(st.integers(1, 20), max_size=4), min_size=1, max_size=3)


def _documents(rows: list[list[int]], pads: int) -> torch.Tensor:
    """Document ids [B, T] for rows of document lengths, -1 after each row's last document."""
    total = max(sum(r) for r in rows) + pads
    documents = torch.full((len(rows), max(total, 1)), -1)
    for b, lengths in enumerate(rows):
        start = 0
        for d, n in enumerate(lengths):
            documents[b, start:start + n] = d
            start += n
    return documents


@given(rows=rows_of_documents, pads=st.integers(0, 3))
def test_layout_unpack_then_pack_is_the_identity_on_real_tokens(rows, pads):
    documents = _documents(rows, pads)
    layout = PackedLayout.from_documents(documents)
    x = torch.randn(*documents.shape, 5)
    assert layout.n_segments == sum(len(r) for r in rows)
    unpacked = layout.unpack(x)
    assert int(layout.valid.sum()) == int((documents >= 0).sum())
    assert torch.equal(layout.pack(unpacked), x * (documents >= 0)[..., None])
    expected_positions = torch.cat([torch.arange(n) for r in rows for n in r] or [torch.zeros(0, dtype=torch.long)])
    assert torch.equal(layout.positions[documents >= 0], expected_positions)


MIXERS = {
    "attention-full": {"type": "attention", "d_model": 16, "n_heads": 2},
    "attention-window4": {"type": "attention", "d_model": 16, "n_heads": 2, "n_kv_heads": 1, "window": 4},
    "gated_deltanet": {"type": "gated_deltanet", "d_model": 16, "n_heads": 2, "head_dim": 4, "chunk_size": 4},
    "mamba2": {"type": "mamba2", "d_model": 16, "d_state": 4, "head_dim": 8, "expand": 1, "chunk_size": 4},
}


@pytest.mark.parametrize("name", list(MIXERS))
def test_each_mixer_packed_equals_each_document_alone(name):
    """The kit's packing invariant: random rows of documents (length 1, around the window and chunk
    sizes, empty rows, trailing pads) equal each document run alone, every element."""
    certify(MIXERS[name], checks=("packing",))


@pytest.mark.parametrize("name", list(MIXERS))
def test_forward_packed_gathers_given_positions_per_document(name):
    """Explicit positions (random, not a range: a misaligned gather changes relative offsets) reach
    each document as if passed to it alone; [3, B, T] M-RoPE positions for attention."""
    torch.manual_seed(0)
    config = dict(MIXERS[name])
    if config["type"] == "attention":
        config.update(head_dim=12, rope={"kind": "mrope", "sections": [2, 2, 2]})
    mixer = build_mixer(config).double()
    documents = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 2, 2, -1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    x = torch.randn(*documents.shape, 16, dtype=torch.float64)
    lead = (3,) if config["type"] == "attention" else ()
    positions = torch.randint(0, 50, (*lead, *documents.shape))
    y = mixer.forward_packed(x, documents, positions=positions)
    assert torch.equal(y[documents < 0], torch.zeros_like(y[documents < 0]))
    for b in range(2):
        for d in documents[b].unique().tolist():
            if d >= 0:
                here = documents[b] == d
                alone, _ = mixer(x[b:b + 1, here], positions=positions[..., b:b + 1, here])
                assert_close(y[b, here], alone[0], f"{name}: row {b} document {d}", torch.float64)


@pytest.mark.parametrize("recipe", ["infinitevl", "mamba2-swa", "transformer"])
@given(rows=rows_of_documents, pads=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_decoder_packed_rows_equal_each_document_alone(recipe, rows, pads, seed):
    """float64: the packed and separate runs differ only in summation order (tolerance 1e-9)."""
    torch.manual_seed(seed)
    model = _decoder(recipe)
    documents = _documents(rows, pads)
    ids = torch.randint(0, 200, documents.shape)
    logits, state = model(ids, documents=documents)
    assert state is None
    for b, lengths in enumerate(rows):
        for d in range(len(lengths)):
            here = documents[b] == d
            alone, _ = model(ids[b:b + 1, here])
            assert_close(logits[b, here], alone[0], f"row {b} document {d}", torch.float64)


_DECODERS: dict[str, Decoder] = {}


def _decoder(recipe: str) -> Decoder:
    if recipe not in _DECODERS:
        torch.manual_seed(0)
        _DECODERS[recipe] = Decoder(mz.registry.recipe(recipe, size="tiny")).double().eval()
    return _DECODERS[recipe]


def test_vlm_packed_documents_with_images_equal_each_alone(monkeypatch):
    """Two documents with an image each packed in one row, a third in another row: the M-RoPE
    positions reaching the decoder equal (exactly) those of each document alone, and so do the
    logits (float64, tolerance 1e-9). The images differ in shape, so a grid given to the wrong
    document would change both; RoPE is shift-invariant, hence the direct check of positions."""
    torch.manual_seed(0)
    model = VLM(vlm_recipe("infinitevl", "tiny")).double().eval()
    decoder_positions = []
    decoder_forward = model.decoder.forward

    def recording_forward(*args, **kwargs):
        decoder_positions.append(kwargs["positions"])
        return decoder_forward(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "forward", recording_forward)
    processor = model.spec.processor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(56, 112, 3), (112, 56, 3), (56, 56, 3)]]
    docs = []
    for i, image in enumerate(images):
        pixels, grid = process_images([image], processor)
        ids = expand_vision_tokens([[10 + i, 11], "image", [12, 13, 14 + i]], image_grid_thw=grid, config=processor)
        docs.append((torch.tensor(ids), pixels.double(), grid))
    rows = [[0, 1], [2]]
    total = max(sum(len(docs[d][0]) for d in row) for row in rows) + 2
    input_ids, documents = torch.zeros(2, total, dtype=torch.long), torch.full((2, total), -1)
    for b, row in enumerate(rows):
        start = 0
        for k, d in enumerate(row):
            n = len(docs[d][0])
            input_ids[b, start:start + n], documents[b, start:start + n] = docs[d][0], k
            start += n
    logits, state = model(input_ids, pixel_values=torch.cat([d[1] for d in docs]),
                          image_grid_thw=torch.cat([d[2] for d in docs]), documents=documents)
    assert state is None
    packed_positions = decoder_positions.pop()  # [3, B, T]
    for b, row in enumerate(rows):
        for k, d in enumerate(row):
            here = documents[b] == k
            alone, _ = model(docs[d][0][None], pixel_values=docs[d][1], image_grid_thw=docs[d][2])
            assert torch.equal(packed_positions[:, b, here], decoder_positions.pop()[:, 0]), f"row {b} document {k}"
            assert_close(logits[b, here], alone[0], f"row {b} document {k}", torch.float64)


def test_packed_gradients_equal_those_of_the_documents_alone():
    """Parameter gradients of a packed batch equal the sum over its documents run alone, in every
    layer (float64, tolerance 1e-9), and none is zero."""
    torch.manual_seed(0)
    model = Decoder(mz.registry.recipe("infinitevl", size="tiny")).double()
    documents = _documents([[5, 7], [12]], 2)
    ids = torch.randint(0, 200, documents.shape)
    logits, _ = model(ids, documents=documents)
    packed = torch.autograd.grad(logits[documents >= 0].square().sum(), list(model.parameters()))
    alone_loss = sum(model(ids[b:b + 1, documents[b] == d])[0].square().sum()
                     for b in range(2) for d in documents[b].unique().tolist() if d >= 0)
    alone = torch.autograd.grad(alone_loss, list(model.parameters()))
    for (name, _), g_packed, g_alone in zip(model.named_parameters(), packed, alone):
        assert_close(g_packed, g_alone, f"d loss / d {name}", torch.float64)
        assert g_packed.abs().sum() > 0, f"{name} got no gradient"


@pytest.mark.parametrize("documents, message", [
    (torch.tensor([[0, 0, 1, 0]]), "non-decreasing"),
    (torch.tensor([[0, -2, 1, 1]]), ">= 0, or -1"),
    (torch.tensor([[0.0, 1.0, 1.0, 1.0]]), "integer tensor"),
])
def test_bad_documents_are_named(documents, message):
    model = _decoder("transformer")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 4, dtype=torch.long), documents=documents)


def test_forward_packed_names_bad_inputs():
    mixer = build_mixer(MIXERS["attention-full"])
    x, documents = torch.randn(1, 4, 16), torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="with \\[B, T\\] = \\[1, 4\\] as in documents"):
        mixer.forward_packed(torch.randn(1, 5, 16), documents)
    with pytest.raises(ValueError, match="positions must be"):
        mixer.forward_packed(x, documents, positions=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-decreasing"):
        mixer.forward_packed(x, torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="integer tensor"):
        mixer.forward_packed(x, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="fresh state"):
        _decoder("transformer").layers[0](x.double(), None, valid=torch.ones(1, 4, dtype=torch.bool), documents=documents)


def test_packed_call_refuses_a_state_and_a_mismatched_valid():
    model = _decoder("transformer")
    ids, documents = torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 0, 1, -1]])
    with pytest.raises(ValueError, match="fresh state"):
        model(ids, model.init_state(1), documents=documents)
    with pytest.raises(ValueError, match="valid must equal"):
        model(ids, documents=documents, valid=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="documents has shape"):
        model(ids, documents=torch.zeros(1, 3, dtype=torch.long))
