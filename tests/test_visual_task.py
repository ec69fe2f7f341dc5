"""Synthetic visual tasks: generator properties (hypothesis), config errors, the VLM training helpers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from mixerzoo.tasks.loop import answer_accuracy, fit
from mixerzoo.tasks.visual import (
    IGNORE, StreamRecallConfig, VisualRecallConfig, derive_seed, make_stream_recall, make_visual_recall,
    render_digits, sized_processor,
)
from mixerzoo.vlm.model import VLM
from mixerzoo.vlm.recipes import vlm_recipe

SPEC = vlm_recipe("gdn", "tiny")
PROCESSOR = sized_processor(SPEC.processor, 28)
VISION_IDS = {PROCESSOR.vision_start_id, PROCESSOR.vision_end_id, PROCESSOR.image_pad_id, PROCESSOR.video_pad_id}


@st.composite
def visual_configs(draw) -> VisualRecallConfig:
    digits = draw(st.integers(1, 2))
    return VisualRecallConfig(n_images=draw(st.integers(1, 5)), filler=draw(st.integers(0, 20)), digits=digits,
                              font_size=14 if digits == 2 else 18, noise=draw(st.sampled_from([0.0, 24.0])))


@st.composite
def stream_configs(draw) -> StreamRecallConfig:
    return StreamRecallConfig(n_keys=draw(st.integers(1, 3)), lead_frames=draw(st.integers(0, 2)),
                              gap_frames=draw(st.integers(0, 12)), digits=draw(st.integers(1, 2)), font_size=14)


def _answer_positions(config, ids: torch.Tensor) -> list[int]:
    """Positions a query's labels sit at: its arrow and the D - 1 teacher-forced digits after it."""
    arrows = (ids == config.arrow_token).nonzero().flatten().tolist()
    return [a + k for a in arrows for k in range(config.digits)]


@given(visual_configs(), st.integers(1, 3), st.integers(0, 2**40))
def test_visual_recall_layout(config, n_examples, seed):
    batch = make_visual_recall(config, n_examples, seed, PROCESSOR)
    ids, labels, K, D = batch["input_ids"], batch["labels"], config.n_images, config.digits
    assert ids.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    # one grid row per image, one vision block per grid row, one pad token per merged patch
    grid = batch["image_grid_thw"]
    assert grid.shape == (n_examples * K, 3)
    assert (ids == PROCESSOR.vision_start_id).sum() == (ids == PROCESSOR.vision_end_id).sum() == n_examples * K
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), PROCESSOR.patch_dim)
    assert (ids == PROCESSOR.image_pad_id).sum() == grid.prod(-1).sum() // PROCESSOR.merge_size**2
    digit_ids = config.token_ranges()["digit_offset"]
    for b in range(n_examples):
        row, row_labels = ids[b], labels[b]
        # labels only at the answer positions of the K queries, each query's D digits
        answered = (row_labels != IGNORE).nonzero().flatten().tolist()
        assert answered == _answer_positions(config, row) and len(answered) == K * D
        arrows = (row == config.arrow_token).nonzero().flatten()
        for arrow in arrows.tolist():
            assert row[arrow - 2] == config.query_token
            image = row[arrow - 1].item() - config.index_offset
            expected = [config.digit_offset + d for d in batch["answers"][b, image].tolist()]
            assert row_labels[arrow:arrow + D].tolist() == expected
            # the distance is from the image's last visual token to the arrow
            starts = (row == PROCESSOR.vision_start_id).nonzero().flatten()
            last_visual = (row == PROCESSOR.vision_end_id).nonzero().flatten()[image] - 1
            assert row[starts[image] - 1] == config.index_offset + image
            assert batch["distance"][b, image] == arrow - last_visual
        # each image is queried once; filler is disjoint from digits, and digits appear only as answers
        assert sorted(row[arrows - 1].tolist()) == [config.index_offset + i for i in range(K)]
        last_image = (row == PROCESSOR.vision_end_id).nonzero().max().item()
        filler = row[last_image + 1:arrows.min() - 2]
        assert len(filler) == config.filler
        assert ((filler >= config.filler_low) & (filler < config.filler_high)).all()
        assert not any(t in digit_ids for t in filler.tolist())
        assert all(t not in digit_ids or p in answered for p, t in enumerate(row.tolist()))
        assert all(t not in VISION_IDS for t in row_labels.tolist())


@given(stream_configs(), st.integers(1, 3), st.integers(0, 2**40))
def test_stream_recall_layout(config, n_examples, seed):
    batch = make_stream_recall(config, n_examples, seed, PROCESSOR)
    ids, labels = batch["input_ids"], batch["labels"]
    slots = config.lead_frames + config.n_keys + config.gap_frames
    # one video per example: slots temporal patches of one merged token each (28x28 frames)
    assert batch["video_grid_thw"].tolist() == [[slots, 2, 2]] * n_examples
    assert batch["pixel_values_videos"].shape == (n_examples * slots * 4, PROCESSOR.patch_dim)
    assert batch["second_per_grid_ts"].shape == (n_examples,)
    assert ((ids == PROCESSOR.video_pad_id).sum(1) == slots).all()
    for b in range(n_examples):
        answered = (labels[b] != IGNORE).nonzero().flatten().tolist()
        assert answered == _answer_positions(config, ids[b]) and len(answered) == config.digits
        key = batch["key"][b].item()
        assert ids[b, answered[0] - 1] == config.index_offset + key
        assert labels[b, answered].tolist() == [config.digit_offset + d for d in batch["answers"][b, key].tolist()]
        # the key frame's token sits `distance` before the arrow: the rest of the stream, then `<ve> Q idx`
        assert batch["distance"][b] == slots - config.lead_frames - key + 3


@given(st.integers(0, 2**40))
def test_generators_are_deterministic_by_seed(seed):
    for make, config in ((make_visual_recall, VisualRecallConfig(n_images=2, filler=3)),
                         (make_stream_recall, StreamRecallConfig(gap_frames=2))):
        first, second, other = (make(config, 2, s, PROCESSOR) for s in (seed, seed, seed + 1))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
        pixels = "pixel_values" if "pixel_values" in first else "pixel_values_videos"
        assert not torch.equal(first[pixels], other[pixels])


def test_rendered_digits_vary_in_position_and_colour():
    config = VisualRecallConfig(noise=0.0)
    rng = np.random.default_rng(0)
    images = [render_digits([7], config, rng) for _ in range(8)]
    assert all(image.shape == (28, 28, 3) and image.dtype == np.uint8 for image in images)
    bright = [np.argwhere(image.max(-1) >= 170) for image in images]  # the text's pixels
    assert all(len(b) > 10 for b in bright)
    assert len({tuple(b.min(0)) for b in bright}) > 1  # jittered position
    assert len({tuple(image[tuple(b[0])]) for image, b in zip(images, bright)}) > 1  # random colour


@pytest.mark.parametrize("fields, message", [
    (dict(query_token=5), "query_token"),  # inside the digit tokens
    (dict(filler_low=30, filler_high=40), "filler_low"),  # overlaps the index and query tokens
    (dict(filler_high=300), "vocab_size"),
    (dict(filler_low=100, filler_high=100), "filler_high"),
    (dict(n_images=17), "n_images"),
    (dict(n_image=4), "n_image"),
    (dict(digits=5), "digits"),
])
def test_visual_config_rejects_bad_fields(fields, message):
    with pytest.raises(ValidationError, match=message):
        VisualRecallConfig(**fields)


def test_stream_config_rejects_bad_fields():
    with pytest.raises(ValidationError, match="gap_frames"):
        StreamRecallConfig(gap_frames=-1)
    with pytest.raises(ValidationError, match="gap_frame"):
        StreamRecallConfig(gap_frame=3)


def test_generator_errors_name_the_problem():
    with pytest.raises(ValueError, match="font_size"):
        make_visual_recall(VisualRecallConfig(digits=3, font_size=18), 1, 0, PROCESSOR)
    with pytest.raises(ValueError, match="image_size"):
        sized_processor(PROCESSOR, 30)
    clash = PROCESSOR.model_copy(update=dict(image_pad_id=1))  # digit 0's token
    with pytest.raises(ValueError, match="image_pad_id.*digit_offset"):
        make_visual_recall(VisualRecallConfig(), 1, 0, clash)
    with pytest.raises(ValueError, match="n_examples"):
        make_stream_recall(StreamRecallConfig(), 0, 0, PROCESSOR)


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, stream, step) for stream in range(2) for step in range(50)}) == 100


def test_training_and_evaluation_run_on_a_vlm():
    torch.manual_seed(0)
    model = VLM(SPEC)
    config = VisualRecallConfig(n_images=2, filler=2)
    result = fit(model, lambda step: make_visual_recall(config, 4, step, PROCESSOR), steps=3, lr=1e-3)
    assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    assert result["losses"][0] == result["initial_loss"] and result["seconds"] > 0
    stream = make_stream_recall(StreamRecallConfig(gap_frames=2), 4, 1, PROCESSOR)
    assert 0.0 <= answer_accuracy(model, [make_visual_recall(config, 4, 100, PROCESSOR), stream]) <= 1.0
