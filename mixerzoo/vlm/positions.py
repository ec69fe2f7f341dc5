"""Qwen2.5-VL M-RoPE position ids (temporal, height, width), computed chunk by chunk.

The rule (Qwen2.5-VL's `get_rope_index`, as released by the Qwen team):

- a text token takes the row's next position p in all three streams; the next is p + 1;
- a vision block is a run of t*h*w image (or video) pad tokens, h and w the MERGED grid
  (grid_h / merge_size, grid_w / merge_size); starting at position s, its token
  (t_idx, h_idx, w_idx) (row-major) takes
  (s + floor(t_idx * second_per_grid_t * tokens_per_second), s + h_idx, s + w_idx),
  with second_per_grid_t = 0 for images (the product is taken in float64, in that order);
- the token after a block takes max(every position so far) + 1.

Transformers 5.x differs in one place: after a block it continues at s + max(h, w), which
is lower than the rule above when a video's temporal positions outrun its height and width.

Chunking: a block is delimited by the pad-token count its grid implies, not by the
vision_start / vision_end tokens (those are text). Grids are consumed in order of first
appearance, rows in order, left to right within a row. A call is given the grids of the
blocks that START in its chunk (the first valid pad token of the block lies in it); a block
cut by the chunk's end keeps its grid, start and progress in `MRopeState`, and the next
chunk continues it. One call over whole sequences therefore takes exactly Qwen's grids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from typing_extensions import Self

from mixerzoo.vlm.processor import ProcessorConfig

_TEXT, _IMAGE, _VIDEO = 0, 1, 2
_KIND_NAME = {_IMAGE: "image", _VIDEO: "video"}


@dataclasses.dataclass
class MRopeState:
    """Where each row's M-RoPE positions stand between chunks: the next text position and any open block.

    All fields have the batch first. A row with `block_kind` 0 has no open block and its
    block fields are 0.
    """

    next_pos: torch.Tensor  # [B] int64: position of the row's next text token (max so far + 1)
    block_kind: torch.Tensor  # [B] int64: 0 none, 1 image, 2 video (a block the last chunk cut)
    block_start: torch.Tensor  # [B] int64: the open block's start position s
    block_grid: torch.Tensor  # [B, 3] int64: its merged grid (t, h / merge, w / merge)
    block_done: torch.Tensor  # [B] int64: its tokens already placed
    block_seconds: torch.Tensor  # [B] float64: its second_per_grid_t (0 for images)

    @classmethod
    def init(cls, batch_size: int, device: torch.device | str = "cpu") -> Self:
        """The state before any token: every row at position 0, no open block."""
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(zeros(batch_size), zeros(batch_size), zeros(batch_size), zeros(batch_size, 3),
                   zeros(batch_size), zeros(batch_size, dtype=torch.float64))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every field by name (what a safetensors file stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Self:
        """The state whose `tensors()` are `tensors`; refuses missing, extra or mis-shaped fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(tensors) != sorted(names):
            raise ValueError(f"an MRopeState needs exactly the tensors {names}, got {sorted(tensors)}")
        state = cls(**tensors)
        rows = state.next_pos.shape
        for name, t in state.tensors().items():
            shape = (*rows, 3) if name == "block_grid" else rows
            dtype = torch.float64 if name == "block_seconds" else torch.long
            if t.dim() != 1 + (name == "block_grid") or tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"MRopeState.{name}: expected shape {list(shape)} {dtype}, got "
                                 f"{list(t.shape)} {t.dtype}")
        return state

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return self.next_pos.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def clone(self) -> Self:
        """An independent copy (a fork)."""
        return dataclasses.replace(self, **{k: t.clone() for k, t in self.tensors().items()})

    def to(self, device: torch.device | str) -> Self:
        """The state on `device`."""
        return dataclasses.replace(self, **{k: t.to(device) for k, t in self.tensors().items()})

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The sub-batch of `rows`, in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.next_pos.device).reshape(-1)
        return dataclasses.replace(self, **{k: t.index_select(0, index) for k, t in self.tensors().items()})

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch holding the rows of `states` in order."""
        if not states:
            raise ValueError("concat needs at least one state")
        return cls(**{f.name: torch.cat([getattr(s, f.name) for s in states]) for f in dataclasses.fields(cls)})


def mrope_positions(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    video_grid_thw: torch.Tensor | Sequence[Sequence[int]] | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    valid: torch.Tensor | None = None,
    state: MRopeState | None = None,
    config: ProcessorConfig = ProcessorConfig(),
) -> tuple[torch.Tensor, MRopeState]:
    """M-RoPE positions [3, B, T] (int64: temporal, height, width) of a chunk, and the state after it.

    input_ids [B, T]; `valid` [B, T] bool marks real tokens (default all): an invalid token
    gets position 0 in all streams and changes nothing, whatever its id. The grids are
    those of the blocks starting in this chunk (see the module docstring), image and video
    rows in raw patch units as the processor returns them; `second_per_grid_ts` holds one
    value per video row (default 1.0 each). `state` None starts every row at position 0.
    The given state is not modified.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {list(input_ids.shape)}")
    B, T = input_ids.shape
    if valid is not None and tuple(valid.shape) != (B, T):
        raise ValueError(f"valid must be [B, T] = {[B, T]} like input_ids, got {list(valid.shape)}")
    if state is None:
        state = MRopeState.init(B)
    if state.batch_size != B:
        raise ValueError(f"state has {state.batch_size} rows, input_ids has {B}")
    image_rows = _merged_grids(image_grid_thw, "image_grid_thw", config.merge_size)
    video_rows = _merged_grids(video_grid_thw, "video_grid_thw", config.merge_size)
    if second_per_grid_ts is None:
        seconds = [1.0] * len(video_rows)
    else:
        seconds = torch.as_tensor(second_per_grid_ts, dtype=torch.float64).reshape(-1).tolist()
        if len(seconds) != len(video_rows):
            raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {len(video_rows)} video_grid_thw rows")
        if any(not s >= 0 for s in seconds):
            raise ValueError(f"second_per_grid_ts must be >= 0, got {seconds}")
    grids = {_IMAGE: [(g, 0.0) for g in image_rows], _VIDEO: list(zip(video_rows, seconds))}  # (merged grid, secs)
    used = {_IMAGE: 0, _VIDEO: 0}

    ids = input_ids.detach().to("cpu", torch.long)
    keep = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.detach().to("cpu", torch.bool)
    kind_all = torch.zeros(B, T, dtype=torch.long)  # [B, T]: 0 text, 1 image pad, 2 video pad
    kind_all[ids == config.image_pad_id] = _IMAGE
    kind_all[ids == config.video_pad_id] = _VIDEO
    positions = torch.zeros(3, B, T, dtype=torch.long)
    new = state.to("cpu").clone()
    tps = float(config.tokens_per_second)

    for b in range(B):
        where = keep[b].nonzero().squeeze(1)  # [L] indices of the row's valid tokens
        kinds = kind_all[b, where]  # [L]
        vision_at = (kinds != _TEXT).nonzero().squeeze(1)  # [V] offsets (among valid tokens) of pad tokens
        out = torch.zeros(3, len(where), dtype=torch.long)  # [3, L]
        nxt = int(new.next_pos[b])
        kind, start, done = int(new.block_kind[b]), int(new.block_start[b]), int(new.block_done[b])
        grid, secs = tuple(new.block_grid[b].tolist()), float(new.block_seconds[b])
        p, L = 0, len(where)
        while p < L:
            if kind == _TEXT:  # text up to the next pad token, then open a block there
                j = int(torch.searchsorted(vision_at, p))
                q = int(vision_at[j]) if j < len(vision_at) else L
                out[:, p:q] = torch.arange(nxt, nxt + q - p)
                nxt += q - p
                p = q
                if p == L:
                    break
                kind = int(kinds[p])
                if used[kind] == len(grids[kind]):
                    raise ValueError(
                        f"row {b}, token {int(where[p])}: {_KIND_NAME[kind]} block #{used[kind] + 1} starts in this "
                        f"chunk but only {len(grids[kind])} {_KIND_NAME[kind]}_grid_thw row(s) were given (give the "
                        f"grids of the blocks that start in the chunk)"
                    )
                grid, secs = grids[kind][used[kind]]
                used[kind] += 1
                start, done = nxt, 0
            size = grid[0] * grid[1] * grid[2]
            take = min(size - done, L - p)
            other = (kinds[p : p + take] != kind).nonzero()
            if len(other):
                at = p + int(other[0])
                raise ValueError(
                    f"row {b}, token {int(where[at])}: {_KIND_NAME[kind]} block of {size} pad tokens cut short after "
                    f"{done + at - p} by token id {int(ids[b, where[at]])} (a grid does not match its pad count?)"
                )
            out[:, p : p + take] = _block_positions(torch.arange(done, done + take), grid, start, secs, tps)
            done += take
            p += take
            if done == size:
                t_last = int(_time_offset(torch.tensor([grid[0] - 1]), secs, tps))
                nxt = start + max(t_last, grid[1] - 1, grid[2] - 1) + 1
                kind, start, done, grid, secs = _TEXT, 0, 0, (0, 0, 0), 0.0
        positions[:, b, where] = out
        new.next_pos[b], new.block_kind[b], new.block_start[b], new.block_done[b] = nxt, kind, start, done
        new.block_grid[b] = torch.tensor(grid)
        new.block_seconds[b] = secs

    for kind, rows in grids.items():
        if used[kind] != len(rows):
            raise ValueError(
                f"{_KIND_NAME[kind]}_grid_thw has {len(rows)} row(s) but only {used[kind]} {_KIND_NAME[kind]} "
                f"block(s) start in this chunk"
            )
    return positions.to(input_ids.device), new.to(state.next_pos.device)


def _time_offset(t_idx: torch.Tensor, seconds: float, tokens_per_second: float) -> torch.Tensor:
    """floor(t_idx * seconds * tokens_per_second), in float64 and that order, as int64."""
    return torch.floor(t_idx.to(torch.float64) * seconds * tokens_per_second).long()


def _block_positions(
    k: torch.Tensor, grid: tuple[int, int, int], start: int, seconds: float, tokens_per_second: float
) -> torch.Tensor:
    """Positions [3, n] of the tokens k [n] (row-major indices) of a block with merged grid (t, h, w) at `start`."""
    _, h, w = grid
    t_idx, h_idx, w_idx = k // (h * w), (k // w) % h, k % w
    return torch.stack([_time_offset(t_idx, seconds, tokens_per_second), h_idx, w_idx]) + start


def _merged_grids(
    grid: torch.Tensor | Sequence[Sequence[int]] | None, name: str, merge: int
) -> list[tuple[int, int, int]]:
    """Grid rows (t, h, w) in patches to merged (t, h / merge, w / merge), validated."""
    if grid is None:
        return []
    grid = torch.as_tensor(grid, dtype=torch.long)
    if grid.numel() == 0:
        return []
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name} must be [n, 3] (t, h, w), got shape {list(grid.shape)}")
    rows = []
    for t, h, w in grid.tolist():
        if min(t, h, w) <= 0 or h % merge or w % merge:
            raise ValueError(f"{name} row {[t, h, w]}: need t, h, w > 0 with h and w divisible by merge_size={merge}")
        rows.append((t, h // merge, w // merge))
    return rows
