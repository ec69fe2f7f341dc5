"""Packed sequences: PackedLayout, and Decoder / VLM rows of several documents equal each document alone.
(Each mixer's own packing invariant is in the conformance kit: certify's `packing` check.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mixerzoo as mz
from mixerzoo.blocks import Decoder
from mixerzoo.mixers.packing import PackedLayout
from mixerzoo.testing import assert_close
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


def test_vlm_packed_documents_with_images_equal_each_alone():
    """Two documents with an image each packed in one row, a third in another row: logits and
    M-RoPE positions as if each ran alone (float64, tolerance 1e-9)."""
    torch.manual_seed(0)
    model = VLM(vlm_recipe("infinitevl", "tiny")).double().eval()
    processor = model.spec.processor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (56, 56, 3), dtype=np.uint8) for _ in range(3)]
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
    logits, _ = model(input_ids, pixel_values=torch.cat([d[1] for d in docs]),
                      image_grid_thw=torch.cat([d[2] for d in docs]), documents=documents)
    for b, row in enumerate(rows):
        for k, d in enumerate(row):
            alone, _ = model(docs[d][0][None], pixel_values=docs[d][1], image_grid_thw=docs[d][2])
            assert_close(logits[b, documents[b] == k], alone[0], f"row {b} document {k}", torch.float64)


def test_packed_gradients_reach_every_layer():
    torch.manual_seed(0)
    model = Decoder(mz.registry.recipe("infinitevl", size="tiny"))
    documents = _documents([[5, 7], [12]], 2)
    logits, _ = model(torch.randint(0, 200, documents.shape), documents=documents)
    logits[documents >= 0].square().mean().backward()
    for i, block in enumerate(model.layers):
        grads = [p.grad for p in block.mixer.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), f"layer {i}"
        assert any(g.abs().sum() > 0 for g in grads), f"layer {i} got no gradient"


@pytest.mark.parametrize("documents, message", [
    (torch.tensor([[0, 0, 1, 0]]), "non-decreasing"),
    (torch.tensor([[0, -2, 1, 1]]), ">= 0, or -1"),
    (torch.tensor([[0.0, 1.0, 1.0, 1.0]]), "integer tensor"),
])
def test_bad_documents_are_named(documents, message):
    model = _decoder("transformer")
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 4, dtype=torch.long), documents=documents)


def test_packed_call_refuses_a_state_and_a_mismatched_valid():
    model = _decoder("transformer")
    ids, documents = torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 0, 1, -1]])
    with pytest.raises(ValueError, match="fresh state"):
        model(ids, model.init_state(1), documents=documents)
    with pytest.raises(ValueError, match="valid must equal"):
        model(ids, documents=documents, valid=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="documents has shape"):
        model(ids, documents=torch.zeros(1, 3, dtype=torch.long))
