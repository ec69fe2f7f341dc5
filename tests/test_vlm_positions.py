"""mixerzoo.vlm.positions: Qwen2.5-VL M-RoPE ids, against transformers and a naive loop, chunk by chunk.

transformers (5.x) `get_rope_index` is called unbound on a stand-in holding a real
Qwen2_5_VLConfig (the method reads only `config.vision_config` and calls
`get_vision_position_ids`), so no model is built.
"""

import functools
import math
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mixerzoo.vlm.positions import MRopeState, mrope_positions
from mixerzoo.vlm.processor import ProcessorConfig, expand_vision_tokens

CFG = ProcessorConfig()
IMG, VID = CFG.image_pad_id, CFG.video_pad_id


@pytest.fixture(scope="module")
def hf_rope_index():
    """transformers' get_rope_index with Qwen2.5-VL's vision settings (merge 2, 2 tokens per second)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = transformers.Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 2, "tokens_per_second": 2})
    shim = types.SimpleNamespace(config=config)
    shim.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, shim)

    def rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None, attention_mask=None):
        mm_token_type_ids = (input_ids == IMG).long() + 2 * (input_ids == VID).long()
        positions, _ = Qwen2_5_VLModel.get_rope_index(
            shim, input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
        )
        return positions

    return rope_index


def _ids(*parts, image_grid=None, video_grid=None) -> list[int]:
    return expand_vision_tokens(list(parts), image_grid, video_grid)


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


# Every video here keeps floor((t - 1) * seconds * 2) below max(h, w) / 2, where transformers 5.x and
# Qwen's rule agree on the text after it (the next test shows where they part).
CASES = {
    "text-only": dict(rows=[[[5, 6, 7, 8]]]),
    "one-image": dict(rows=[[[1, 2], "image", [3, 4, 5]]], image=[[1, 4, 6]]),
    "two-images-of-different-sizes": dict(rows=[[[1], "image", [2, 3], "image", [4]]], image=[[1, 6, 4], [1, 2, 8]]),
    "video": dict(rows=[[[1, 2], "video", [3, 4]]], video=[[3, 4, 8]], seconds=[0.5]),
    "video-fractional-step": dict(rows=[[[1], "video", [2]]], video=[[4, 8, 10]], seconds=[0.75]),  # t: 0 1 3 4
    "video-2s-per-grid": dict(rows=[[[1, 2], "video", [3]]], video=[[2, 8, 12]], seconds=[2.0]),  # t: 0 4
    "mixed-batch-left-padded": dict(
        rows=[[[1, 2, 3], "image", [4], "video", [5, 6]], [[7], "video", [8], "image", "image", [9, 10, 11]]],
        image=[[1, 4, 4], [1, 2, 6], [1, 4, 2]],
        video=[[2, 4, 8], [2, 2, 4]],
        seconds=[1.0, 0.5],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_transformers(case, hf_rope_index):
    spec = CASES[case]
    image = torch.tensor(spec["image"]) if "image" in spec else None
    video = torch.tensor(spec["video"]) if "video" in spec else None
    seconds = torch.tensor(spec["seconds"], dtype=torch.float64) if "seconds" in spec else None
    rows, n_img, n_vid = [], 0, 0
    for parts in spec["rows"]:  # each row takes the next grids, rows in order (Qwen's order)
        k_img, k_vid = parts.count("image"), parts.count("video")
        rows.append(_ids(*parts, image_grid=None if image is None else image[n_img: n_img + k_img],
                         video_grid=None if video is None else video[n_vid: n_vid + k_vid]))
        n_img, n_vid = n_img + k_img, n_vid + k_vid
    ids, mask = _left_pad(rows)
    want = hf_rope_index(ids, image, video, seconds, mask)
    got, state = mrope_positions(ids, image_grid_thw=image, video_grid_thw=video, second_per_grid_ts=seconds,
                                 valid=mask.bool())
    assert got.dtype == torch.long and got.shape == (3, *ids.shape)
    assert torch.equal(got, want)  # pads get 0 in both
    assert state.next_pos.tolist() == (want.amax(dim=(0, 2)) + 1).tolist()
    assert state.block_kind.tolist() == [0] * len(rows)


def test_text_after_long_video_follows_qwen_not_transformers_5(hf_rope_index):
    """Qwen's rule puts the token after a block at max(positions) + 1 (transformers PR #35569, the
    Qwen team's code); transformers 5.x continues at start + max(h, w) instead, which differs once
    a video's temporal positions outrun its height and width. Vision positions agree."""
    video = torch.tensor([[4, 2, 2]])  # merged 4 x 1 x 1: temporal offsets 0, 2, 4, 6 at 1 s per grid
    ids = torch.tensor([_ids([1, 2], "video", [3, 4], video_grid=video)])  # 2 text, start, 4 pads, end, 2 text
    got, _ = mrope_positions(ids, video_grid_thw=video, second_per_grid_ts=[1.0])
    s = 3  # after "1 2 <vision_start>"
    assert got[0, 0].tolist() == [0, 1, 2, s, s + 2, s + 4, s + 6, s + 7, s + 8, s + 9]
    assert got[1, 0].tolist() == got[2, 0].tolist() == [0, 1, 2, s, s, s, s, s + 7, s + 8, s + 9]
    want = hf_rope_index(ids, video_grid_thw=video, second_per_grid_ts=torch.tensor([1.0]))
    assert torch.equal(got[:, :, :7], want[:, :, :7])
    assert want[0, 0, 7].item() == s + 1  # transformers 5.x: start + max(1, 1)


# ----- naive reference and random sequences -----

TEXT_IDS = [1, 2, 3, CFG.vision_start_id, CFG.vision_end_id]


def _reference(segments) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Token ids and positions of one row, token by token, from Qwen's rule."""
    ids, pos, nxt = [], [], 0
    for seg in segments:
        if seg[0] == "text":
            for token in seg[1]:
                ids.append(token)
                pos.append((nxt, nxt, nxt))
                nxt += 1
            continue
        kind, (t, h, w), seconds = seg
        block = [(nxt + math.floor(ti * seconds * CFG.tokens_per_second), nxt + hi, nxt + wi)
                 for ti in range(t) for hi in range(h // 2) for wi in range(w // 2)]
        ids += [IMG if kind == "image" else VID] * len(block)
        pos += block
        nxt = max(max(p) for p in block) + 1
    return ids, pos


segment = st.one_of(
    st.tuples(st.just("text"), st.lists(st.sampled_from(TEXT_IDS), min_size=1, max_size=4)),
    st.tuples(st.just("image"), st.tuples(st.just(1), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4])),
              st.just(0.0)),
    st.tuples(st.just("video"), st.tuples(st.integers(1, 3), st.sampled_from([2, 4]), st.sampled_from([2, 6])),
              st.sampled_from([0.25, 0.5, 1.0, 1.5, 2 / 3, 0.3, 3.0])),
)


@st.composite
def batches(draw):
    """Rows of random segments with invalid tokens (any id, pad ids included) spread anywhere."""
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        segments = draw(st.lists(segment, max_size=4))
        ids, pos = _reference(segments)
        blocks = [s for s in segments if s[0] != "text"]
        valid = [True] * len(ids)
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(ids)))
            ids.insert(at, draw(st.sampled_from([0, IMG, VID, 1])))
            pos.insert(at, (0, 0, 0))
            valid.insert(at, False)
        rows.append((ids, pos, valid, blocks))
    T = max(len(r[0]) for r in rows)
    ids = torch.tensor([[IMG] * (T - len(r[0])) + r[0] for r in rows])  # left pads carry a pad id on purpose
    want = torch.zeros(len(rows), T, 3, dtype=torch.long)  # [B, T, 3]: left pads at 0
    for b, r in enumerate(rows):
        if r[1]:
            want[b, T - len(r[1]):] = torch.tensor(r[1])
    want = want.permute(2, 0, 1)  # [3, B, T]
    valid = torch.tensor([[False] * (T - len(r[2])) + r[2] for r in rows])
    cuts = sorted(draw(st.sets(st.integers(1, max(T - 1, 1)), max_size=4))) if T > 1 else []
    return ids, valid, want, [r[3] for r in rows], cuts


def _grids_for(blocks_per_row, valid, ids, lo, hi):
    """Image grids, video grids and seconds of the blocks whose first valid token lies in [lo, hi)."""
    image, video, seconds = [], [], []
    for b, blocks in enumerate(blocks_per_row):
        tokens = [(col, int(ids[b, col])) for col in range(ids.shape[1]) if valid[b, col]]  # the reference's ids
        k = 0
        for kind, grid, secs in blocks:  # text ids are never pad ids: a block begins at the next pad
            pad = IMG if kind == "image" else VID
            while tokens[k][1] != pad:
                k += 1
            if lo <= tokens[k][0] < hi:
                (image if kind == "image" else video).append(list(grid))
                if kind == "video":
                    seconds.append(secs)
            k += grid[0] * (grid[1] // 2) * (grid[2] // 2)
    return image or None, video or None, seconds or None


@given(batches())
def test_one_call_matches_reference_and_chunks_match_one_call(batch):
    ids, valid, want, blocks, cuts = batch
    image, video, seconds = _grids_for(blocks, valid, ids, 0, ids.shape[1])
    whole, final = mrope_positions(ids, image_grid_thw=image, video_grid_thw=video, second_per_grid_ts=seconds,
                                   valid=valid)
    assert torch.equal(whole, want)
    state, pieces = None, []
    for lo, hi in zip([0, *cuts], [*cuts, ids.shape[1]]):
        image, video, seconds = _grids_for(blocks, valid, ids, lo, hi)
        before = None if state is None else state.clone()
        out, new = mrope_positions(ids[:, lo:hi], image_grid_thw=image, video_grid_thw=video,
                                   second_per_grid_ts=seconds, valid=valid[:, lo:hi], state=state)
        if before is not None:  # the given state is never modified
            assert all(torch.equal(before.tensors()[k], v) for k, v in state.tensors().items())
        pieces.append(out)
        state = new
    assert torch.equal(torch.cat(pieces, dim=2), whole)
    assert all(torch.equal(final.tensors()[k], v) for k, v in state.tensors().items())


# ----- state -----


def _mid_block_state():
    """A batch of 2 cut inside a video (row 0) and inside text (row 1), plus the rest of the sequence."""
    video = [[3, 4, 4]]
    row0 = _ids([1], "video", [2, 3], video_grid=video)
    row1 = list(range(5, 5 + len(row0)))
    ids = torch.tensor([row0, row1])
    whole, _ = mrope_positions(ids, video_grid_thw=video, second_per_grid_ts=[0.5])
    _, state = mrope_positions(ids[:, :5], video_grid_thw=video, second_per_grid_ts=[0.5])
    return ids, whole, state


def test_state_round_trip_fork_select_concat(tmp_path):
    ids, whole, state = _mid_block_state()
    assert state.block_kind.tolist() == [2, 0] and state.block_done.tolist() == [3, 0]
    assert state.nbytes == 2 * 8 * 8 and state.batch_size == 2
    save_file(state.tensors(), str(tmp_path / "mrope.safetensors"))
    loaded = MRopeState.from_tensors(load_file(str(tmp_path / "mrope.safetensors")))
    for continued in (loaded, state.clone(), MRopeState.concat([state.select([0]), state.select([1])])):
        rest, _ = mrope_positions(ids[:, 5:], state=continued)
        assert torch.equal(rest, whole[:, :, 5:])
    swapped, _ = mrope_positions(ids[[1, 0], 5:], state=state.select([1, 0]))
    assert torch.equal(swapped, whole[:, [1, 0], 5:])
    fork = state.clone()
    mrope_positions(ids[:, 5:], state=fork)
    fork.next_pos += 100  # forks are independent
    assert torch.equal(mrope_positions(ids[:, 5:], state=state)[0], whole[:, :, 5:])


def test_decode_and_empty_chunks_continue():
    ids = torch.tensor([_ids([1, 2], "image", image_grid=[[1, 4, 4]])])
    _, state = mrope_positions(ids, image_grid_thw=[[1, 4, 4]])
    empty, same = mrope_positions(ids[:, :0], state=state)
    assert empty.shape == (3, 1, 0) and torch.equal(same.next_pos, state.next_pos)
    step, after = mrope_positions(torch.tensor([[7]]), state=state)
    assert step[:, 0, 0].tolist() == [state.next_pos.item()] * 3 and after.next_pos.item() == state.next_pos.item() + 1
    pad, unchanged = mrope_positions(torch.tensor([[IMG]]), state=state, valid=torch.tensor([[False]]))
    assert pad.tolist() == [[[0]]] * 3 and torch.equal(unchanged.next_pos, state.next_pos)


def test_from_tensors_errors():
    good = MRopeState.init(2).tensors()
    with pytest.raises(ValueError, match="exactly the tensors"):
        MRopeState.from_tensors({k: v for k, v in good.items() if k != "block_grid"})
    with pytest.raises(ValueError, match="block_grid"):
        MRopeState.from_tensors({**good, "block_grid": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="block_seconds"):
        MRopeState.from_tensors({**good, "block_seconds": torch.zeros(2)})
    with pytest.raises(ValueError, match="at least one"):
        MRopeState.concat([])


# ----- errors -----


def test_errors():
    one_image = torch.tensor([_ids([1], "image", [2], image_grid=[[1, 2, 2]])])
    with pytest.raises(ValueError, match="image pad tokens start a block but no image_grid_thw"):
        mrope_positions(one_image)
    two_images = torch.tensor([_ids("image", "image", image_grid=[[1, 2, 2], [1, 2, 2]])])
    with pytest.raises(ValueError, match="1 image_grid_thw row.* fill another number of blocks"):
        mrope_positions(two_images, image_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="2 image_grid_thw row.* fill another number of blocks"):
        mrope_positions(one_image, image_grid_thw=[[1, 2, 2], [1, 2, 2]])
    with pytest.raises(ValueError, match="block is cut short by another token"):
        mrope_positions(one_image, image_grid_thw=[[1, 4, 2]])  # grid says 2 pads, the prompt has 1
    _, cut = mrope_positions(one_image[:, :3], image_grid_thw=[[1, 4, 2]])  # a block of 2 pads, 1 seen
    with pytest.raises(ValueError, match="block the last chunk cut is cut short"):
        mrope_positions(torch.tensor([[7, IMG]]), state=cut)
    mixed = torch.tensor([[1, IMG, VID, 2]])
    with pytest.raises(ValueError, match="block is cut short by another token"):
        mrope_positions(mixed, image_grid_thw=[[1, 4, 2]], video_grid_thw=[[1, 2, 2]])
    with pytest.raises(ValueError, match="second_per_grid_ts has 2 values for 1"):
        mrope_positions(torch.tensor([[VID]]), video_grid_thw=[[1, 2, 2]], second_per_grid_ts=[1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        mrope_positions(torch.tensor([[VID]]), video_grid_thw=[[1, 2, 2]], second_per_grid_ts=[-1.0])
    with pytest.raises(ValueError, match="divisible by merge_size"):
        mrope_positions(torch.tensor([[IMG]]), image_grid_thw=[[1, 3, 2]])
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        mrope_positions(torch.tensor([[IMG]]), image_grid_thw=[1, 2, 2])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        mrope_positions(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="valid must be"):
        mrope_positions(torch.tensor([[1, 2]]), valid=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="state has 2 rows"):
        mrope_positions(torch.tensor([[1, 2]]), state=MRopeState.init(2))
