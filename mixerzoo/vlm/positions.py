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

Everything is computed on the device the ids live on, without reading a device value back:
the grids are host metadata (Python ints), the token kinds, ranks and block positions are
cumulative sums and lookups, and malformed input fails a device-side check. A decode step
or a stream frame therefore never waits for the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from typing_extensions import Self

from mixerzoo.mixers.base import device_check
from mixerzoo.vlm.processor import ProcessorConfig, grid_rows

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
    device = input_ids.device
    if valid is not None and tuple(valid.shape) != (B, T):
        raise ValueError(f"valid must be [B, T] = {[B, T]} like input_ids, got {list(valid.shape)}")
    if state is None:
        state = MRopeState.init(B, device=device)
    if state.batch_size != B:
        raise ValueError(f"state has {state.batch_size} rows, input_ids has {B}")
    image_rows = _merged_grids(image_grid_thw, "image_grid_thw", config.merge_size)
    video_rows = _merged_grids(video_grid_thw, "video_grid_thw", config.merge_size)
    if second_per_grid_ts is None:
        seconds = [1.0] * len(video_rows)
    else:
        if isinstance(second_per_grid_ts, torch.Tensor):
            second_per_grid_ts = second_per_grid_ts.reshape(-1).tolist()
        seconds = [float(s) for s in second_per_grid_ts]
        if len(seconds) != len(video_rows):
            raise ValueError(f"second_per_grid_ts has {len(seconds)} values for {len(video_rows)} video_grid_thw rows")
        if any(not s >= 0 for s in seconds):
            raise ValueError(f"second_per_grid_ts must be >= 0, got {seconds}")
    if T == 0:
        if image_rows or video_rows:
            raise ValueError("an empty chunk starts no block: give no image_grid_thw / video_grid_thw")
        return torch.zeros(3, B, 0, dtype=torch.long, device=device), state.clone()

    tps = float(config.tokens_per_second)
    keep = torch.ones(B, T, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    kind = torch.where(input_ids == config.image_pad_id, _IMAGE, torch.where(input_ids == config.video_pad_id, _VIDEO, _TEXT))
    kind = kind * keep  # [B, T]: 0 text (or invalid), 1 image pad, 2 video pad
    rank = keep.cumsum(1) - 1  # [B, T] index of each valid token among the row's valid tokens
    n_valid = keep.sum(1)  # [B]

    # The block the last chunk cut continues through the row's first `rest` valid tokens.
    open_grid = state.block_grid * (state.block_kind != _TEXT)[:, None]  # [B, 3]
    rest = torch.minimum(open_grid.prod(1) - state.block_done, n_valid)  # [B]
    in_open = keep & (rank < rest[:, None])  # [B, T]
    device_check((~in_open | (kind == state.block_kind[:, None])).all(),
                 "M-RoPE: a block the last chunk cut is cut short by another token (does its grid match its pad count?)")
    block = _Tokens(  # per token: its block's grid, seconds and start, and its index in the block
        grid=open_grid[:, None, :].expand(B, T, 3), seconds=state.block_seconds[:, None].expand(B, T),
        index=state.block_done[:, None] + rank, member=in_open,
    )
    for pad_kind, rows, secs in ((_IMAGE, image_rows, [0.0] * len(image_rows)), (_VIDEO, video_rows, seconds)):
        block = block.merge(_new_blocks(kind == pad_kind, rows, secs, in_open, _KIND_NAME[pad_kind]))

    size = block.grid.prod(-1)  # [B, T]
    advance = _advance(block.grid, block.seconds, tps)  # [B, T]: what a block adds to the text position
    last = block.member & (block.index == size - 1)  # [B, T]: each block's final token
    step = torch.where(block.member, torch.where(last, advance, 0), keep.long())  # [B, T]
    step = torch.where(in_open & last, state.block_start[:, None] + advance - state.next_pos[:, None], step)
    before = state.next_pos[:, None] + step.cumsum(1) - step  # [B, T]: text position reached before each token
    start = torch.where(in_open, state.block_start[:, None], before)  # [B, T]: a block token's block start
    offsets = _block_offsets(block.index, block.grid, block.seconds, tps)  # [3, B, T]
    positions = torch.where(block.member, start + offsets, before) * keep  # [3, B, T]

    in_order = kind.new_zeros(B, T + 1).scatter(1, torch.where(keep, rank, T), kind)  # [B, T + 1]: valid tokens' kinds
    nxt = in_order.gather(1, (rank + 1).clamp(max=T))  # [B, T]: the next valid token's kind
    running_on = block.member & ~last & (rank + 1 < n_valid[:, None])  # [B, T]: a block token another follows
    device_check((~running_on | (nxt == kind)).all(),
                 "M-RoPE: an image / video block is cut short by another token (a grid does not match its pad count?)")

    at = (keep * torch.arange(1, T + 1, device=device)).argmax(1, keepdim=True)  # [B, 1]: each row's last valid token
    ends_open = (n_valid > 0) & (block.member & ~last).gather(1, at)[:, 0]  # [B]: the row ends inside a block
    moved = n_valid > 0

    def after(value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """A state field after the chunk: the last token's block's `value` [B, T, ...] if that block stays
        open, 0 if it closed, `old` for a row without valid tokens."""
        index = at.view(B, 1, *([1] * (value.dim() - 2))).expand(B, 1, *value.shape[2:])
        taken = value.gather(1, index)[:, 0]  # [B, ...]
        rows = (B, *([1] * (taken.dim() - 1)))
        return torch.where(moved.view(rows), torch.where(ends_open.view(rows), taken, 0), old)

    new = MRopeState(
        next_pos=state.next_pos + step.sum(1),
        block_kind=after(kind, state.block_kind),
        block_start=after(start, state.block_start),
        block_grid=after(block.grid, state.block_grid),
        block_done=after(block.index + 1, state.block_done),
        block_seconds=after(block.seconds, state.block_seconds),
    )
    return positions, new


@dataclasses.dataclass
class _Tokens:
    """Per token of a chunk [B, T]: whether it belongs to a block, and that block's grid, seconds and the
    token's index in it (zero grid elsewhere)."""

    grid: torch.Tensor  # [B, T, 3] long: merged (t, h, w)
    seconds: torch.Tensor  # [B, T] float64
    index: torch.Tensor  # [B, T] long
    member: torch.Tensor  # [B, T] bool

    def merge(self, other: "_Tokens | None") -> "_Tokens":
        """These tokens with `other`'s block tokens taken from `other`."""
        if other is None:
            return self
        m = other.member
        return _Tokens(torch.where(m[..., None], other.grid, self.grid), torch.where(m, other.seconds, self.seconds),
                       torch.where(m, other.index, self.index), self.member | m)


def _new_blocks(is_pad: torch.Tensor, rows: list[tuple[int, int, int]], seconds: list[float],
                in_open: torch.Tensor, name: str) -> _Tokens | None:
    """The blocks of one kind that start in the chunk: pad tokens (is_pad [B, T], outside the open block)
    take the grids `rows` in order, row after row, each block as many tokens as its grid holds."""
    fresh = is_pad & ~in_open  # [B, T]
    device = fresh.device
    if not rows:
        device_check(~fresh.any(), f"M-RoPE: {name} pad tokens start a block but no {name}_grid_thw rows were given "
                                   f"(give the grids of the blocks that start in the chunk)")
        return None
    sizes = [t * h * w for t, h, w in rows]
    ends = torch.tensor([0] + sizes, dtype=torch.long).cumsum(0).to(device, non_blocking=True)  # [G + 1]
    grids = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)  # [G, 3]
    secs = torch.tensor(seconds, dtype=torch.float64).to(device, non_blocking=True)  # [G]
    counts = fresh.sum(1)  # [B]
    first, used = [], torch.zeros(1, dtype=torch.long, device=device)  # [1]: blocks started in earlier rows
    for b in range(fresh.shape[0]):  # a row's blocks begin after the blocks of the rows before it
        first.append(used)
        used = torch.searchsorted(ends, ends[used.clamp(max=len(sizes))] + counts[b : b + 1])
    device_check((used == len(sizes)).all(), f"M-RoPE: {len(sizes)} {name}_grid_thw row(s) were given but the chunk's "
                                     f"{name} pad tokens fill another number of blocks (give the grids of the blocks "
                                     f"that start in the chunk, each with its pad count)")
    offset = ends[torch.cat(first).clamp(max=len(sizes))][:, None] + fresh.cumsum(1) - 1  # [B, T]: pad's rank
    which = (torch.searchsorted(ends, offset, right=True) - 1).clamp(0, len(sizes) - 1)  # [B, T]: its grid row
    return _Tokens(grid=grids[which], seconds=secs[which], index=offset - ends[which], member=fresh)


def _advance(grid: torch.Tensor, seconds: torch.Tensor, tokens_per_second: float) -> torch.Tensor:
    """How far a block with merged grid (t, h, w) [..., 3] moves the text position: max(last offset) + 1."""
    t, h, w = grid.unbind(-1)
    return torch.maximum(_time_offset(t - 1, seconds, tokens_per_second), torch.maximum(h, w) - 1) + 1


def _time_offset(t_idx: torch.Tensor, seconds: torch.Tensor, tokens_per_second: float) -> torch.Tensor:
    """floor(t_idx * seconds * tokens_per_second), in float64 and that order, as int64."""
    return torch.floor(t_idx.to(torch.float64) * seconds * tokens_per_second).long()


def _block_offsets(index: torch.Tensor, grid: torch.Tensor, seconds: torch.Tensor,
                   tokens_per_second: float) -> torch.Tensor:
    """Offsets [3, ...] from its block's start of the token `index` (row-major) in a block of merged grid
    [..., 3]; index 0 where the grid is empty (text)."""
    _, h, w = grid.clamp(min=1).unbind(-1)
    t_idx, h_idx, w_idx = index // (h * w), (index // w) % h, index % w
    return torch.stack([_time_offset(t_idx, seconds, tokens_per_second), h_idx, w_idx])


def _merged_grids(
    grid: torch.Tensor | Sequence[Sequence[int]] | None, name: str, merge: int
) -> list[tuple[int, int, int]]:
    """Grid rows (t, h, w) in patches to merged (t, h / merge, w / merge), validated."""
    rows = []
    for t, h, w in grid_rows(grid, name):
        if h % merge or w % merge:
            raise ValueError(f"{name} row {[t, h, w]}: need t, h, w > 0 with h and w divisible by merge_size={merge}")
        rows.append((t, h // merge, w // merge))
    return rows
