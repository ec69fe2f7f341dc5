"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv:2405.04434), the softmax attention of DeepSeek-V2/V3
and Kimi Linear, as a mixer whose state is the latent cache.

Each token writes one latent c = RMSNorm(W_dkv x) [r] and one rotary key k_rope [d_rope] shared by every
head; head h's key is [W_uk_h c ; k_rope] and its value W_uv_h c. The cache holds only c and k_rope, so
it grows by r + d_rope per token whatever the head count. The "torch" path runs attention in the latent
space (the up-projections absorbed into the query and the output: q_h^T W_uk_h c = (W_uk_h^T q_h)^T c);
"reference" expands every head's keys and values from the cache, as the paper writes it.

The cache is a KVCache of one "head" with k = c [B, 1, L, r] and v = k_rope [B, 1, L, d_rope]: it grows,
forks, saves, pads and preallocates (with_capacity) as full attention's does.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from typing_extensions import Self

from mixerzoo.mixers.attention import (
    _INDEX_BYTES, Attention, KVCache, RopeConfig, StaticKVCache, append_one, store_static, store_tokens,
)
from mixerzoo.mixers.base import Mixer, MixerConfig
from mixerzoo.ops import rotary_tables, rotate


class MLAConfig(MixerConfig):
    """Multi-head latent attention: H heads reading a cache of one r-dim latent and one d_rope-dim rotary key
    per token. Defaults are DeepSeek-V2-Lite's head shapes divided by 4 (r 512 -> 128, 128 / 64 / 128 -> 32 /
    16 / 32); Kimi Linear's MLA is rope kind none (NoPE) with r = 512."""

    type: Literal["mla"] = Field("mla", description="the mixer type")
    n_heads: int = Field(4, gt=0, description="query heads")
    kv_lora_rank: int = Field(128, gt=0, description="r: width of the latent each token caches (DeepSeek-V2/V3: 512)")
    q_lora_rank: int | None = Field(None, gt=0, description="low-rank query (DeepSeek-V3: 1536) through an RMSNorm; "
                                    "None: one full query projection (V2-Lite, Kimi Linear)")
    qk_nope_head_dim: int = Field(32, gt=0, description="per-head key / query dims without rotary (DeepSeek: 128)")
    qk_rope_head_dim: int = Field(16, gt=0, description="dims of the shared rotary key and each query's rotary part "
                                  "(DeepSeek: 64)")
    v_head_dim: int = Field(32, gt=0, description="per-head value dim (DeepSeek: 128)")
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of the latent's (and the low-rank query's) RMSNorm")
    rope: RopeConfig = Field(RopeConfig(), description="rotary embedding of the rotary dims (kind none: NoPE, as "
                             "Kimi Linear)")

    @model_validator(mode="after")
    def _shapes_fit(self) -> Self:
        if self.backend not in ("auto", "torch", "reference"):
            raise ValueError(f"backend {self.backend!r}: mla runs 'auto', 'torch' (latent space) or 'reference'")
        if self.rope.fraction != 1:
            raise ValueError(f"rope.fraction {self.rope.fraction}: mla rotates exactly its qk_rope_head_dim dims")
        if self.rope.kind != "none" and self.qk_rope_head_dim % 2:
            raise ValueError(f"rotary embeddings need an even qk_rope_head_dim, got {self.qk_rope_head_dim}")
        if self.rope.kind == "mrope" and sum(self.rope.sections) != self.qk_rope_head_dim // 2:
            raise ValueError(f"rope.sections {list(self.rope.sections)} must sum to qk_rope_head_dim // 2 = "
                             f"{self.qk_rope_head_dim // 2}")
        return self

    @property
    def rotary_dim(self) -> int:
        """The dims rotary embeddings rotate: the rotary key and each query's rotary part."""
        return self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        """Per-head query / key dim: the non-rotary and rotary parts."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def mixing_flops_per_token(self, context: int) -> int:
        """In the latent space, per head and visible token: scores over r + d_rope dims and the weighted sum of
        r-dim latents, 2 (r + d_rope) + 2 r."""
        return 2 * self.n_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim) * context

    def state_nbytes(self, n_tokens: int, batch_size: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
        """One latent and one rotary key per token seen, plus the token count."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return batch_size * (n_tokens * (self.kv_lora_rank + self.qk_rope_head_dim) * itemsize + _INDEX_BYTES)


class MLA(Mixer):
    """Multi-head latent attention with DeepSeek's parameter names (q_proj or q_a_proj / q_a_layernorm /
    q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj)."""

    config_class = MLAConfig
    state_class = KVCache
    dense_valid = True

    def __init__(self, config: MLAConfig):
        super().__init__(config)
        c, d = config, config.d_model
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(d, c.n_heads * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, c.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(c.q_lora_rank, eps=c.norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, c.n_heads * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(c.kv_lora_rank, eps=c.norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.v_head_dim, d, bias=False)

    def init_state(self, batch_size, *, device=None, dtype=None, capacity: int | None = None):
        """An empty latent cache in the activation dtype (a StaticKVCache of `capacity` slots when given)."""
        c = self.config
        device, dtype = self.state_placement(device, dtype)
        latent = torch.zeros(batch_size, 1, 0, c.kv_lora_rank, device=device, dtype=dtype)
        rotary = torch.zeros(batch_size, 1, 0, c.qk_rope_head_dim, device=device, dtype=dtype)
        seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        state = KVCache(k=latent, v=rotary, seen=seen).counted(0)
        return state if capacity is None else state.with_capacity(capacity)

    def _forward(self, x, state, positions, valid):
        c = self.config
        batch, length, _ = x.shape
        query = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = query.unflatten(-1, (c.n_heads, c.qk_head_dim)).split([c.qk_nope_head_dim, c.qk_rope_head_dim], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_layernorm(latent)[:, :, None], k_rope[:, :, None]  # [B, T, 1, r], [B, T, 1, dr]
        static = isinstance(state, StaticKVCache)
        host_seen = None if static or torch.compiler.is_compiling() else state.host_seen
        index = Attention._index(state, valid, host_seen, batch, length, x.device)()  # [B, T] token numbers
        if c.rope.kind != "none":
            position = self._positions(positions, index, batch, length)
            tables = rotary_tables(position, c.qk_rope_head_dim, theta=c.rope.theta, sections=c.rope.sections,
                                   dtype=query.dtype)
            q_rope, k_rope = rotate(q_rope, *tables), rotate(k_rope, *tables)

        state = self._store(state, latent, k_rope, valid, index, host_seen)
        visible = torch.arange(state.k.shape[2], device=x.device) <= index[..., None]  # [B, T, L]: causal, per row
        if valid is not None:
            visible = visible | ~valid[..., None]  # a pad attends to finite slots; its output is zeroed
        up_k, up_v = self.kv_b_proj.weight.unflatten(0, (c.n_heads, -1)).split([c.qk_nope_head_dim, c.v_head_dim], 1)
        if c.backend == "reference":  # every head's keys and values expanded from the cache
            keys = torch.cat([torch.einsum("bslr,hnr->bhln", state.k, up_k),
                              state.v.expand(-1, c.n_heads, -1, -1)], dim=-1)  # [B, H, L, dn + dr]
            values = torch.einsum("bslr,hvr->bhlv", state.k, up_v)  # [B, H, L, dv]
            o = F.scaled_dot_product_attention(torch.cat([q_nope, q_rope], -1).transpose(1, 2), keys, values,
                                               attn_mask=visible[:, None], scale=c.qk_head_dim**-0.5)
        else:  # in the latent space: W_uk folded into the queries, W_uv applied after
            q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, up_k)  # [B, H, T, r]
            keys = torch.cat([state.k, state.v], dim=-1)  # [B, 1, L, r + dr]
            o_latent = F.scaled_dot_product_attention(
                torch.cat([q_latent, q_rope.transpose(1, 2)], -1), keys, state.k, attn_mask=visible[:, None],
                scale=c.qk_head_dim**-0.5, enable_gqa=True)  # [B, H, T, r]
            o = torch.einsum("bhtr,hvr->bhtv", o_latent, up_v)
        y = self.o_proj(o.transpose(1, 2).flatten(2))
        return (y if valid is None else y * valid[..., None]), state

    def _positions(self, positions, index, batch: int, length: int) -> torch.Tensor:
        """Rotary positions: given ones checked for shape, else the token numbers."""
        streams = len(self.config.rope.sections or ())
        want = (streams, batch, length) if streams else (batch, length)
        if positions is None:
            return index.expand(want)
        if tuple(positions.shape) != want:
            raise ValueError(f"MLA: positions must have shape {list(want)}, got {list(positions.shape)}")
        return positions

    @staticmethod
    def _store(state, latent, k_rope, valid, index, host_seen: int | None):
        """The cache with the chunk's valid latents and rotary keys [B, T, 1, *] at their token numbers."""
        if isinstance(state, StaticKVCache):  # written in place; pads into the spare slot
            return store_static(state, latent, k_rope, valid, index, "MLA: the static latent cache")
        if valid is None and host_seen is not None:  # every row the same length: append in place past the end
            length = latent.shape[1]
            return state.append(latent.transpose(1, 2), k_rope.transpose(1, 2), state.seen + length).counted(
                host_seen + length)
        if latent.shape[1] == 1:  # a decode step: no host sync
            return append_one(state, latent, k_rope, valid)
        valid = torch.ones(index.shape, dtype=torch.bool, device=index.device) if valid is None else valid
        return store_tokens(state, latent, k_rope, valid, index, window=None)
