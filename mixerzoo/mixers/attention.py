"""Softmax attention as a mixer: full (window=None) or sliding window (window=W).

Full attention keeps every past key and value (post-rotary): its state grows by one
slot per token, written into spare capacity of a preallocated buffer (no copy per token). Sliding-window attention keeps a ring buffer of the last W keys and
values per row (token n lives in slot n % W): its state is constant. Positions and
windows count valid tokens only.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Callable, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.errors import StrictModel
from mixerzoo.mixers.base import Mixer, MixerConfig, MixerState, device_check, fused_linear
from mixerzoo.ops import attention, rotary_tables, rotate

_INDEX_BYTES = 8  # the int64 count of tokens seen, one per row


class RopeConfig(StrictModel):
    """Rotary embedding: none, 1-D RoPE, or multimodal M-RoPE (3 position streams)."""

    kind: Literal["none", "rope", "mrope"] = Field("rope",
        description="rotary embedding: none, rope (1-D positions) or mrope (Qwen2.5-VL temporal / height / width sections)")
    theta: float = Field(10000.0, gt=0, description="rotary base frequency")
    sections: tuple[int, ...] | None = Field(None, description="M-RoPE: frequencies per stream (t, h, w)")
    fraction: float = Field(1.0, gt=0, le=1, description="share of each head's dims that rotate, the first ones "
                            "(partial rotary: Qwen3-Next 0.25); the rest pass unrotated")

    @model_validator(mode="after")
    def _sections_match_kind(self) -> Self:
        if self.kind == "mrope" and not self.sections:
            raise ValueError("rope.sections is required for kind 'mrope' (Qwen2.5-VL: [16, 24, 24])")
        if self.kind != "mrope" and self.sections is not None:
            raise ValueError(f"rope.sections only applies to kind 'mrope', not {self.kind!r}")
        return self


class AttentionConfig(MixerConfig):
    """Multi-head softmax attention with grouped KV heads; window=None is full attention."""

    type: Literal["attention"] = Field("attention", description="the mixer type")
    n_heads: int = Field(gt=0, description="query heads")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (GQA); default n_heads")
    head_dim: int | None = Field(None, gt=0, description="default d_model // n_heads")
    window: int | None = Field(None, description="sliding window in tokens (itself + window - 1 before); None = full")
    qkv_bias: bool = Field(False, description="bias on the q, k and v projections (Qwen2.5 has one)")
    o_bias: bool = Field(False, description="bias on the output projection (RecurrentGemma has one)")
    qk_norm: bool = Field(False, description="RMSNorm on each query and key head")
    output_gate: bool = Field(False, description="sigmoid(gate_proj x) times the heads' output before o_proj "
                              "(Qwen3-Next's gated attention)")
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of the q / k RMSNorm (qk_norm)")
    rope: RopeConfig = Field(RopeConfig(), description="rotary position embedding of q and k")

    omitted_when_default: ClassVar[tuple[str, ...]] = ("o_bias",)

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 (or null for full attention), got {self.window}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) does not divide d_model ({self.d_model}); set head_dim explicitly"
            )
        if self.rope.kind != "none" and (self.rotary_dim % 2 or self.rotary_dim < 2):
            raise ValueError(f"rotary embeddings need an even number >= 2 of rotated dims, got {self.rotary_dim} "
                             f"(head_dim {self.dim} x rope.fraction {self.rope.fraction})")
        if self.rope.kind == "mrope" and sum(self.rope.sections) != self.rotary_dim // 2:
            raise ValueError(f"rope.sections {list(self.rope.sections)} must sum to the rotated dims // 2 = "
                             f"{self.rotary_dim // 2}")
        return self

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that rotary embeddings rotate."""
        return int(self.dim * self.rope.fraction)

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads."""
        return self.n_kv_heads or self.n_heads

    @property
    def dim(self) -> int:
        """Per-head dimension."""
        return self.head_dim or self.d_model // self.n_heads

    def mixing_flops_per_token(self, context: int) -> int:
        """q.k and p.v against every visible key: 4 * heads * head_dim * min(context, window)."""
        visible = context if self.window is None else min(context, self.window)
        return 4 * self.n_heads * self.dim * visible

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """K and V for `window` slots (sliding) or every token (full), plus the token count.

        For full attention this is the used length, what `state.nbytes` reports and `save` writes;
        the buffers behind it reserve up to 1.5x more (`KVCache.reserved_nbytes`)."""
        slots = n_tokens if self.window is None else self.window
        itemsize = torch.empty((), dtype=dtype).element_size()
        return batch_size * (2 * slots * self.kv_heads * self.dim * itemsize + _INDEX_BYTES)


# Spare capacity of a full-attention buffer when it must grow: 1.5x the tokens it then holds
# (at least _MIN_CAPACITY), so a stream of T tokens copies each key O(1) times in all.
_GROWTH, _MIN_CAPACITY = 1.5, 64


class _Buffer:
    """Storage behind a full-attention cache: `tensor` [B, Hkv, capacity, D] and `claimed`, the
    longest prefix any state has been handed (slots past it are free to write)."""

    def __init__(self, tensor: torch.Tensor, claimed: int):
        self.tensor, self.claimed = tensor, claimed


def _append(cache: torch.Tensor, block: torch.Tensor, buffer: _Buffer | None) -> tuple[torch.Tensor, _Buffer]:
    """cache [B, Hkv, L, D] followed by block [B, Hkv, n, D] along dim 2, as the prefix view of a
    buffer with spare capacity, and that buffer; `cache` itself is never changed.

    The block is written in place into slots L .. L + n - 1 of `buffer` (the one cache is a prefix
    of) when it has room and no state has claimed those slots, so two states continuing from the
    same cache never write into each other's slots. Otherwise, and whenever either tensor requires
    grad (autograd sees only out-of-place ops), both go into a fresh buffer of 1.5x the length.
    """
    length, n = cache.shape[2], block.shape[2]
    if (
        buffer is not None
        and buffer.claimed == length
        and buffer.tensor.shape[2] >= length + n
        and cache.data_ptr() == buffer.tensor.data_ptr()
        and cache.stride() == buffer.tensor.stride()
        and not (cache.requires_grad or block.requires_grad)
    ):
        buffer.tensor[:, :, length : length + n] = block
        buffer.claimed = length + n
    else:
        spare = max(math.ceil(_GROWTH * (length + n)), _MIN_CAPACITY) - length - n
        tensor = torch.cat([cache, block, cache.new_zeros(*cache.shape[:2], spare, cache.shape[3])], dim=2)
        buffer = _Buffer(tensor, length + n)
    return buffer.tensor[:, :, : length + n], buffer


class _HostCounted:
    """Host metadata of an attention cache: `host_seen`, the tokens every row has seen when the host
    knows them equal (an int), or None when it does not; read once with a sync (the state came from
    load, select, concat or a user) and then carried from step to step, so steps never read it back.
    For a KVCache, host_seen = n also means k and v hold exactly n slots."""

    @property
    def host_seen(self) -> int | None:
        """Tokens seen by every row, when all rows have seen the same number (else None)."""
        if "_host_seen" not in self.__dict__:
            equal = bool((self.seen == self.seen[:1]).all()) if self.seen.numel() else True
            n = int(self.seen[0]) if equal and self.seen.numel() else 0
            self.__dict__["_host_seen"] = n if equal and (self.k.shape[2] == n or self.window_cache) else None
        return self.__dict__["_host_seen"]

    def _carry_count(self, made: Self) -> Self:
        """`made` (a copy of this state) marked with this state's host count, when it has one."""
        return made.counted(self.__dict__["_host_seen"]) if "_host_seen" in self.__dict__ else made

    def counted(self, host_seen: int | None) -> Self:
        """This state, marked with `host_seen` (what the step that made it knows); a compiled step
        leaves it unmarked (its shapes never depend on host counts)."""
        if not torch.compiler.is_compiling():
            self.__dict__["_host_seen"] = host_seen
        return self

    def clone(self) -> Self:
        """An independent copy (a fork), with the host's count."""
        return self._carry_count(super().clone())

    def poisoned(self, rows: torch.Tensor, before: MixerState) -> Self:
        """The rows `rows` marked non-finite (see MixerState.poisoned), with the host's count."""
        return self._carry_count(super().poisoned(rows, before))

    def to(self, device=None, dtype=None) -> Self:
        """Moved and cast (see MixerState.to), with the host's count."""
        return self._carry_count(super().to(device=device, dtype=dtype))


@dataclasses.dataclass
class KVCache(_HostCounted, MixerState):
    """Full-attention state: keys and values of every valid token seen, row-compact.

    `k` and `v` are prefix views of buffers with spare capacity (see `_append`): a decode step
    writes one slot past the end instead of copying the cache. `nbytes`, `save` and every
    comparison see the used length only; `reserved_nbytes` counts the buffers. A state made
    any other way (clone, select, concat, load, to) has no spare capacity until it grows.
    Rows with pads may leave the length above max(seen); slots past a row's count are zero.
    `with_capacity(n)` gives the same cache as a StaticKVCache of n slots (graphs, compile).
    """

    k: torch.Tensor = dataclasses.field(metadata={"variable_dims": (2,)})  # [B, Hkv, L, D], L >= max(seen)
    v: torch.Tensor = dataclasses.field(metadata={"variable_dims": (2,)})  # [B, Hkv, L, D]
    seen: torch.Tensor  # [B] int64: valid tokens seen; row b's keys are k[b, :, :seen[b]], the rest zero
    window_cache: ClassVar[bool] = False

    def append(self, block_k: torch.Tensor, block_v: torch.Tensor, seen: torch.Tensor) -> Self:
        """This cache followed by block_k, block_v [B, Hkv, n, D], with token counts `seen`; self is unchanged."""
        buffer_k, buffer_v = self.__dict__.get("_buffers", (None, None))
        k, buffer_k = _append(self.k, block_k, buffer_k)
        v, buffer_v = _append(self.v, block_v, buffer_v)
        grown = dataclasses.replace(self, k=k, v=v, seen=seen)
        grown.__dict__["_buffers"] = (buffer_k, buffer_v)
        return grown

    @property
    def reserved_nbytes(self) -> int:
        """Bytes of the buffers behind k and v (used length plus spare capacity) and the counter."""
        buffers = self.__dict__.get("_buffers", (None, None))
        held = sum((t if b is None else b.tensor).nbytes for t, b in zip((self.k, self.v), buffers))
        return held + self.seen.nbytes

    def contiguous(self) -> Self:
        """The state as it is: prefix views of a buffer are the canonical layout (save writes them
        contiguous, and a loaded state continues bit-identically)."""
        return self

    def poisoned(self, rows: torch.Tensor, before: MixerState) -> Self:
        """The rows `rows` marked non-finite: NaN written in place into the slots this chunk added
        (they belong to this state alone; all of the row's slots when the chunk copied the cache), so
        marking costs the chunk's size, not the cache's."""
        if self.k.requires_grad or self.v.requires_grad:
            return super().poisoned(rows, before)
        shared = self.k.data_ptr() == before.k.data_ptr() and before.k.numel() > 0
        start = before.k.shape[2] if shared else 0
        for cache in (self.k, self.v):
            cache[:, :, start:].masked_fill_(rows[:, None, None, None], torch.nan)
        return self

    def select(self, rows: Sequence[int] | torch.Tensor) -> Self:
        """The given rows, with the cache trimmed to their longest history."""
        picked = super().select(rows)
        length = int(picked.seen.max()) if picked.seen.numel() else 0
        return dataclasses.replace(picked, k=picked.k[:, :, :length], v=picked.v[:, :, :length])

    @classmethod
    def concat(cls, states: Sequence[Self]) -> Self:
        """One batch of `states`' rows; shorter caches are padded with empty slots."""
        length = max((s.k.shape[2] for s in states), default=0)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, length - t.shape[2]))

        return super().concat([dataclasses.replace(s, k=pad(s.k), v=pad(s.v)) for s in states])

    def with_capacity(self, capacity: int) -> "StaticKVCache":
        """This cache preallocated to `capacity` tokens per row (a StaticKVCache; one host sync to check
        that every row fits)."""
        longest = int(self.seen.max()) if self.seen.numel() else 0
        if capacity < max(longest, 1):
            raise ValueError(f"KVCache.with_capacity: capacity {capacity} is below the {longest} tokens a row holds")
        length = self.k.shape[2]
        keep = min(length, capacity)
        k, v = (t.new_zeros(*t.shape[:2], capacity + 1, t.shape[3]) for t in (self.k, self.v))  # + the pads' slot
        k[:, :, :keep], v[:, :, :keep] = self.k[:, :, :keep], self.v[:, :, :keep]
        return StaticKVCache(k=k, v=v, seen=self.seen.clone())


@dataclasses.dataclass
class StaticKVCache(MixerState):
    """Full-attention state in a preallocated buffer of fixed capacity C, written in place.

    Row b's keys are k[b, :, :seen[b]]; slot C takes the writes of pads and is never read. Every
    shape is fixed, so a decode step is one static program (a CUDA graph, torch.compile without
    recompiles) that attends over all C slots with a length mask. Unlike every other state, a step
    writes into this one's buffers (copying C slots per token would cost more than the step):
    `clone()` it to keep a fork. Made by `KVCache.with_capacity` or `Attention.init_state(capacity=)`;
    a full cache is an error (raised on the device under CUDA).
    """

    k: torch.Tensor  # [B, Hkv, C + 1, D]
    v: torch.Tensor  # [B, Hkv, C + 1, D]
    seen: torch.Tensor  # [B] int64

    @property
    def capacity(self) -> int:
        """Tokens each row can hold."""
        return self.k.shape[2] - 1

    def poisoned(self, rows: torch.Tensor, before: MixerState) -> Self:
        """The rows `rows` marked non-finite: NaN written in place into the slots this chunk filled
        (from the row's count before it to its count now)."""
        slots = torch.arange(self.k.shape[2], device=self.k.device)
        filled = (slots >= before.seen[:, None]) & (slots < self.seen[:, None]) & rows[:, None]  # [B, C + 1]
        for cache in (self.k, self.v):
            cache.masked_fill_(filled[:, None, :, None], torch.nan)
        return self

    def dynamic(self) -> KVCache:
        """The same cache as a growing KVCache of the longest row's length (one host sync)."""
        length = int(self.seen.max()) if self.seen.numel() else 0
        return KVCache(k=self.k[:, :, :length].clone(), v=self.v[:, :, :length].clone(), seen=self.seen.clone())

    def with_capacity(self, capacity: int) -> "StaticKVCache":
        """This cache with `capacity` slots per row."""
        return self.dynamic().with_capacity(capacity)

    def save(self, path, config) -> None:
        """Saved as the KVCache it holds (what `Mixer.load_state` reads)."""
        self.dynamic().save(path, config)

    def check_compatible(self, expected: MixerState, *, owner: str) -> None:
        """Compatible with the mixer whose (growing) KVCache is `expected`."""
        KVCache(k=self.k, v=self.v, seen=self.seen).check_compatible(expected, owner=owner)


@dataclasses.dataclass
class RingKVCache(_HostCounted, MixerState):
    """Sliding-window state: a ring of the last W keys and values per row."""

    k: torch.Tensor  # [B, Hkv, W, D]; token n (counting valid tokens from 0) lives in slot n % W
    v: torch.Tensor  # [B, Hkv, W, D]
    seen: torch.Tensor  # [B] int64: valid tokens seen
    window_cache: ClassVar[bool] = True

    def contiguous(self) -> Self:
        """The state with contiguous tensors, with the host's count."""
        made = super().contiguous()
        return made if made is self else self._carry_count(made)


class Attention(Mixer):
    """Softmax attention mixer (full or sliding window) with GQA, RoPE / M-RoPE and optional q/k norm."""

    config_class = AttentionConfig
    dense_valid = True

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        c = config
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * c.dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * c.dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.dim, c.d_model, bias=c.o_bias)
        if c.output_gate:
            self.gate_proj = nn.Linear(c.d_model, c.n_heads * c.dim, bias=False)
        if c.qk_norm:
            self.q_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
            self.k_norm = nn.RMSNorm(c.dim, eps=c.norm_eps)

    @property
    def state_class(self) -> type[MixerState]:
        """KVCache for full attention, RingKVCache for a sliding window."""
        return KVCache if self.config.window is None else RingKVCache

    def init_state(self, batch_size, *, device=None, dtype=None, capacity: int | None = None):
        """Empty cache (full; a StaticKVCache of `capacity` slots when given) or an empty ring of
        `window` slots (sliding), in the activation dtype."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        slots = 0 if c.window is None else c.window
        kv = torch.zeros(batch_size, c.kv_heads, slots, c.dim, device=device, dtype=dtype)
        seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        state = self.state_class(k=kv, v=kv.clone(), seen=seen).counted(0)
        return state if capacity is None or c.window is not None else state.with_capacity(capacity)

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, _ = x.shape
        qkv = fused_linear(self, "qkv", (self.q_proj, self.k_proj, self.v_proj), x)
        qk, v = qkv.split([(c.n_heads + c.kv_heads) * c.dim, c.kv_heads * c.dim], dim=-1)
        qk, v = qk.unflatten(-1, (c.n_heads + c.kv_heads, c.dim)), v.unflatten(-1, (c.kv_heads, c.dim))
        # a compiled step must not specialise on a count that changes every step
        host_seen = None if isinstance(state, StaticKVCache) or torch.compiler.is_compiling() else state.host_seen
        index = self._index(state, valid, host_seen, batch, length, x.device)  # [B, T] (made when read)
        if c.qk_norm:
            q, k = qk.split([c.n_heads, c.kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if c.rope.kind != "none":  # q and k rotated together
            position = self._positions(positions, index, batch, length)
            tables = rotary_tables(position, c.rotary_dim, theta=c.rope.theta, sections=c.rope.sections, dtype=qk.dtype)
            if c.rotary_dim == c.dim:
                qk = rotate(qk, *tables)
            else:  # partial rotary: the leading dims turn, the rest pass
                qk = torch.cat([rotate(qk[..., : c.rotary_dim], *tables), qk[..., c.rotary_dim :]], dim=-1)
        q, k = qk.split([c.n_heads, c.kv_heads], dim=2)

        if isinstance(state, StaticKVCache):
            o, state = self._attend_static(q, k, v, state, valid, index())
        elif c.window is not None and length > 1 and torch.compiler.is_compiling():
            o, state = self._chunk_ring_masked(q, k, v, state, valid, index())
        elif c.backend == "reference" or (valid is not None or host_seen is None) and length > 1:
            valid = torch.ones(batch, length, dtype=torch.bool, device=x.device) if valid is None else valid
            o = self._attend_rowwise(q, k, v, state, valid)
            state = store_tokens(state, k, v, valid, index(), self.config.window)
        elif c.window is not None and length == 1:
            o, state = self._decode_ring(q, k, v, state, valid)
        elif c.window is not None:
            o, state = self._chunk_ring(q, k, v, state, host_seen)
        elif length == 1 and valid is not None or host_seen is None:
            o, state = self._decode_full_masked(q, k, v, state, valid)
        else:
            o, state = self._chunk_full(q, k, v, state, host_seen)
        o = o.reshape(batch, length, c.n_heads * c.dim)
        y = self.o_proj(o * torch.sigmoid(self.gate_proj(x)) if c.output_gate else o)
        return (y if valid is None else y * valid[..., None]), state

    @staticmethod
    def _index(state, valid, host_seen: int | None, batch: int, length: int, device) -> Callable[[], torch.Tensor]:
        """A function giving each token's number in its row [B, T] (valid tokens counted), made on first call."""
        made: list[torch.Tensor] = []

        def index() -> torch.Tensor:
            if not made:
                if valid is None and host_seen is not None:  # known on the host
                    made.append(torch.arange(host_seen, host_seen + length, device=device).expand(batch, length))
                elif valid is None:
                    made.append(state.seen[:, None] + torch.arange(length, device=device))
                else:
                    made.append(state.seen[:, None] + valid.cumsum(1) - 1)
            return made[0]

        return index

    def _positions(self, positions: torch.Tensor | None, index: Callable[[], torch.Tensor], batch: int, length: int):
        """Rotary positions: given ones checked for shape, else the token numbers."""
        streams = len(self.config.rope.sections or ())
        want = (streams, batch, length) if streams else (batch, length)
        if positions is None:
            return index().expand(want)
        if tuple(positions.shape) != want:
            raise ValueError(f"Attention: positions must have shape {list(want)}, got {list(positions.shape)}")
        return positions

    def _past(self, state: MixerState, rows: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last `count` keys and values of each row in `rows`, oldest first: [G, count, Hkv, D]."""
        slots = state.seen[rows, None] - count + torch.arange(count, device=rows.device)  # [G, count]
        if self.config.window is not None:
            slots = slots % self.config.window
        return state.k[rows[:, None], :, slots], state.v[rows[:, None], :, slots]

    def _attend_rowwise(self, q, k, v, state, valid):
        """Each row's valid queries against its history plus its valid chunk tokens, in time order.

        Rows with the same (history length, valid count) share one op call.
        """
        c = self.config
        seen = state.seen if c.window is None else state.seen.clamp(max=c.window - 1)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row, key in enumerate(zip(seen.tolist(), valid.sum(1).tolist())):
            groups[key].append(row)
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid tokens first, in order
        o = q.new_zeros(q.shape)
        for (n_past, n_new), row_list in groups.items():
            if n_new == 0:
                continue
            rows = torch.tensor(row_list, device=q.device)
            picks = order[rows, :n_new]  # [G, n_new]
            past_k, past_v = self._past(state, rows, n_past)
            keys = torch.cat([past_k, k[rows[:, None], picks]], dim=1)
            values = torch.cat([past_v, v[rows[:, None], picks]], dim=1)
            o[rows[:, None], picks] = attention(q[rows[:, None], picks], keys, values, window=c.window, backend=c.backend)
        return o

    def _chunk_full(self, q, k, v, state, host_seen: int):
        """T tokens in every row after host_seen in every row: append in place past the end, attend causally."""
        length = q.shape[1]
        state = state.append(k.transpose(1, 2), v.transpose(1, 2), state.seen + length).counted(host_seen + length)
        if length == 1:
            return _decode_attention(q, state.k, state.v), state
        o = attention(q, state.k.transpose(1, 2), state.v.transpose(1, 2), backend=self.config.backend)
        return o, state

    def _decode_full_masked(self, q, k, v, state, valid):
        """One token per row, rows of any lengths (or pads): a copy one slot longer, each valid row's key
        written at its own count, attended with a length mask. No host sync."""
        state = append_one(state, k, v, valid)
        filled = torch.arange(state.k.shape[2], device=q.device) < state.seen[:, None]  # [B, L + 1]
        if valid is not None:
            filled = filled | ~valid  # a pad row attends to finite slots; its output is zeroed
        return _decode_attention(q, state.k, state.v, filled[:, None, None, :]), state

    def _chunk_ring(self, q, k, v, state, host_seen: int):
        """T tokens in every row after host_seen in every row: the ring's tokens in time order, then the
        chunk, attended with the window; the last W of them become the new ring. Shapes and slots are
        host ints, so there is no sync."""
        window, length = self.config.window, q.shape[1]
        if host_seen < window:  # slots 0 .. n - 1 hold tokens 0 .. n - 1
            past_k, past_v = state.k[:, :, :host_seen], state.v[:, :, :host_seen]
        else:  # oldest first
            shift = -(host_seen % window)
            past_k, past_v = state.k.roll(shift, dims=2), state.v.roll(shift, dims=2)
        keys = torch.cat([past_k, k.transpose(1, 2)], dim=2)  # [B, Hkv, n_past + T, D]
        values = torch.cat([past_v, v.transpose(1, 2)], dim=2)
        o = attention(q, keys.transpose(1, 2), values.transpose(1, 2), window=window, backend=self.config.backend)
        total = host_seen + length
        if total < window:
            pad = (0, 0, 0, window - total)
            ring_k, ring_v = F.pad(keys, pad), F.pad(values, pad)
        else:  # tokens total - W .. total - 1; token m lives in slot m % W
            ring_k = keys[:, :, -window:].roll(total % window, dims=2)
            ring_v = values[:, :, -window:].roll(total % window, dims=2)
        seen = state.seen + length
        return o, dataclasses.replace(state, k=ring_k, v=ring_v, seen=seen).counted(total)

    def _chunk_ring_masked(self, q, k, v, state, valid, index):
        """A chunk into a ring whose counts the host does not know (a compiled step): the ring's W slots
        and the chunk attended with a mask of token numbers, then the newest W written to their slots.
        Every shape is fixed; no host sync."""
        window = self.config.window
        batch, length, heads, dim = k.shape
        keep = torch.ones(batch, length, dtype=torch.bool, device=q.device) if valid is None else valid
        seen = state.seen + keep.sum(1)  # [B]
        before = state.seen[:, None] - 1
        held = before - (before - torch.arange(window, device=q.device)) % window  # [B, W]: slot's token (< 0: none)
        numbers = torch.cat([held, torch.where(keep, index, -1)], dim=1)[:, None, :]  # [B, 1, W + T]
        query = index[..., None]  # [B, T, 1]
        visible = (numbers >= 0) & (numbers <= query) & (numbers > query - window)  # [B, T, W + T]
        visible = visible | ~keep[..., None]  # a pad attends to finite slots; its output is zeroed
        keys = torch.cat([state.k, k.transpose(1, 2)], dim=2)  # [B, Hkv, W + T, D]
        values = torch.cat([state.v, v.transpose(1, 2)], dim=2)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=visible[:, None], enable_gqa=True
        ).transpose(1, 2)
        newest = keep & (index >= seen[:, None] - window)  # [B, T]: chunk tokens the new ring keeps
        slots = torch.where(newest, index % window, window)[:, None, :, None].expand(batch, heads, length, dim)
        ring_k, ring_v = (F.pad(ring, (0, 0, 0, 1)).scatter(2, slots, new.transpose(1, 2))[:, :, :window]
                          for ring, new in ((state.k, k), (state.v, v)))  # slot W takes the rest
        return o, dataclasses.replace(state, k=ring_k, v=ring_v, seen=seen).counted(None)

    def _attend_static(self, q, k, v, state: StaticKVCache, valid, index):
        """Any chunk into a static cache: valid tokens written in place at their counts (pads into the
        spare slot), then every query attends over all slots with a causal length mask."""
        capacity = state.capacity
        state = store_static(state, k, v, valid, index, "Attention: the static KV cache")
        visible = torch.arange(capacity + 1, device=q.device) <= index[..., None]  # [B, T, C + 1]
        if valid is not None:
            visible = visible | ~valid[..., None]  # a pad attends to finite slots; its output is zeroed
        if q.shape[1] == 1:
            o = _decode_attention(q, state.k, state.v, visible[:, None])
        else:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), state.k, state.v, attn_mask=visible[:, None], enable_gqa=True
            ).transpose(1, 2)
        return o, state

    def _decode_ring(self, q, k, v, state, valid):
        """One token per row: write it into its ring slot (a pad row writes back the slot's own value),
        then attend over the filled slots in place. No host sync, so a CUDA graph can capture it."""
        window = self.config.window
        rows = torch.arange(q.shape[0], device=q.device)
        slots = state.seen % window  # [B]
        new_k, new_v = state.k.clone(), state.v.clone()
        if valid is None:
            new_k[rows, :, slots], new_v[rows, :, slots] = k[:, 0], v[:, 0]
            seen = state.seen + 1
            filled = torch.arange(window, device=q.device) < seen[:, None]  # [B, W]
        else:
            keep = valid[:, 0, None, None]
            new_k[rows, :, slots] = torch.where(keep, k[:, 0], state.k[rows, :, slots])
            new_v[rows, :, slots] = torch.where(keep, v[:, 0], state.v[rows, :, slots])
            seen = state.seen + valid[:, 0]
            # Slot s holds a token of the window iff it has been written; a pad row sees its
            # (finite) slots and its output is zeroed by the caller.
            filled = (torch.arange(window, device=q.device) < seen[:, None]) | ~valid
        host_seen = None if valid is not None or torch.compiler.is_compiling() else state.__dict__.get("_host_seen")
        o = _decode_attention(q, new_k, new_v, filled[:, None, None, :])
        return o, dataclasses.replace(state, k=new_k, v=new_v, seen=seen).counted(
            None if host_seen is None else host_seen + 1
        )


def store_static(state: StaticKVCache, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                 index: torch.Tensor, what: str) -> StaticKVCache:
    """The static cache with the chunk's valid keys k [B, T, Hk, Dk] and values v [B, T, Hv, Dv] written in place
    at their token numbers `index` [B, T] (pads into the spare slot); a full cache is an error naming `what`."""
    capacity = state.capacity
    seen = state.seen + (k.shape[1] if valid is None else valid.sum(1))
    device_check((seen <= capacity).all(), f"{what} of {capacity} slots is full")
    slots = index if valid is None else torch.where(valid, index, capacity)  # [B, T]
    for cache, new in ((state.k, k), (state.v, v)):
        cache.scatter_(2, slots[:, None, :, None].expand(-1, new.shape[2], -1, new.shape[3]), new.transpose(1, 2))
    return dataclasses.replace(state, seen=seen)


def append_one(state: KVCache, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> KVCache:
    """The cache with one token per row, k [B, 1, Hk, Dk] and v [B, 1, Hv, Dv], written at each row's own count
    in a copy one slot longer (a pad row writes zeros past its end and keeps its count). No host sync."""
    seen = state.seen + (1 if valid is None else valid[:, 0])
    new = []
    for cache, token in ((state.k, k), (state.v, v)):
        token = token.transpose(1, 2)  # [B, H, 1, D]
        if valid is not None:
            token = token * valid[:, None, None, :1]  # a pad writes zero past its row's end
        slot = state.seen[:, None, None, None].expand(-1, token.shape[1], 1, token.shape[3])
        new.append(F.pad(cache, (0, 0, 0, 1)).scatter(2, slot, token))
    return dataclasses.replace(state, k=new[0], v=new[1], seen=seen).counted(None)


def store_tokens(state, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, index: torch.Tensor,
                 window: int | None):
    """A KVCache (window None) or RingKVCache after storing the chunk's valid keys k [B, T, Hk, Dk] and
    values v [B, T, Hv, Dv] at their token numbers `index` [B, T] (the input state is untouched); reads the
    counts back (host syncs), so the host knows them again afterwards."""
    seen = state.seen + valid.sum(1)
    counts = seen.tolist()
    host_seen = counts[0] if counts and all(n == counts[0] for n in counts) else None
    rows, cols = valid.nonzero(as_tuple=True)
    if window is not None:
        keep = valid & (index >= seen[:, None] - window)  # only the last W tokens reach the ring
        rows, cols = keep.nonzero(as_tuple=True)
        slots = index[rows, cols] % window
        new_k, new_v = state.k.clone(), state.v.clone()
        new_k[rows, :, slots], new_v[rows, :, slots] = k[rows, cols], v[rows, cols]
        return dataclasses.replace(state, k=new_k, v=new_v, seen=seen).counted(host_seen)
    length = state.k.shape[2]
    slots = index[rows, cols] - length  # [N]: slot relative to the current end; < 0 inside a shorter row
    grow = max(max(counts, default=0) - length, 0)
    shape_k, shape_v = ((t.shape[0], t.shape[2], grow, t.shape[3]) for t in (k, v))
    if host_seen is not None and host_seen != length + grow:
        host_seen = None  # the cache is longer than every row (pads grew it before)
    if bool((slots >= 0).all()):  # appends only: a block past the end, written in place where free
        block_k, block_v = k.new_zeros(shape_k), v.new_zeros(shape_v)
        block_k[rows, :, slots], block_v[rows, :, slots] = k[rows, cols], v[rows, cols]
        return state.append(block_k, block_v, seen).counted(host_seen)
    # a shorter row writes below the end, inside the input state's view: copy first
    new_k = torch.cat([state.k, k.new_zeros(shape_k)], dim=2)
    new_v = torch.cat([state.v, v.new_zeros(shape_v)], dim=2)
    new_k[rows, :, slots + length], new_v[rows, :, slots + length] = k[rows, cols], v[rows, cols]
    return dataclasses.replace(state, k=new_k, v=new_v, seen=seen).counted(host_seen)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row against cached keys: q [B, 1, Hq, D]; k, v [B, Hkv, S, D]; mask [B, 1, 1, S] or None.

    The query heads that share a KV head ride as that head's query rows ([B, Hkv, Hq / Hkv, D]),
    so SDPA reads each cached key once and never expands the cache for GQA. Returns [B, 1, Hq, D].
    """
    batch, _, heads, dim = q.shape
    grouped = q.view(batch, k.shape[1], heads // k.shape[1], dim)
    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask).reshape(batch, 1, heads, dim)
