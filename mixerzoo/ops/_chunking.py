"""Chunk layout and decay tables shared by the chunked linear recurrences (gated_linear_attention,
gated_delta_rule): scalar decays ([..., C]) and per-key-channel decays ([..., C, K]) alike."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Longest chunk for per-channel decays, whose pairwise decays are a [C, C, K] table per chunk (not a matmul):
# its cost per token grows with C, the sequential carry's with 1 / C. Measured on CPU, one thread, forward
# (GLA and KDA forms; T = 4096 H = 4 K = V = 64, T = 2048 H = 2 K = V = 128, T = 1024 H = 8 K = 32 V = 64):
# chunks of 8 were fastest or within 10% of it in every case, 2.5-5x faster than 32.
CHANNEL_DECAY_CHUNK = 8


def chunk_length(g: torch.Tensor, chunk_size: int) -> int:
    """The chunk a chunked op runs for decays g [B, T, h, Kg]: chunk_size, at most CHANNEL_DECAY_CHUNK per channel."""
    return chunk_size if g.shape[-1] == 1 else min(chunk_size, CHANNEL_DECAY_CHUNK)


def to_chunks(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, T, h, *D] -> [N, B*h, C, *D], chunk-major, the last chunk padded with zeros."""
    batch, seq_len = x.shape[:2]
    n_chunks = -(-seq_len // size)
    pad = n_chunks * size - seq_len
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(batch, n_chunks, size, *x.shape[2:]).permute(1, 0, 3, 2, *range(4, x.dim() + 1))
    return x.reshape(n_chunks, -1, size, *x.shape[4:])


def from_chunks(o: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[N, B*h, C, V] -> [B, T, h, V], dropping the padded tail."""
    n_chunks, _, size, dim_v = o.shape
    o = o.reshape(n_chunks, batch, -1, size, dim_v).permute(1, 0, 3, 2, 4)
    return o.reshape(batch, n_chunks * size, -1, dim_v)[:, :seq_len]


def flushed_exp(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """exp(x) for x <= 0 (times a boolean mask), with results below sqrt(smallest normal) flushed to 0.

    The product of two results is then still a normal number (the flushed ones are below 1e-19 in
    float32): subnormal arithmetic, and exp of inputs whose result is subnormal or 0, run tens of
    times slower on CPUs.
    """
    floor = math.log(torch.finfo(x.dtype).tiny) / 2
    keep = x > floor if mask is None else (x > floor) & mask
    return x.clamp_min(floor).exp() * keep


def segment_decay(g: torch.Tensor) -> torch.Tensor:
    """Log decays over a chunk -> the decay between every pair of its steps.

    g [..., C, Kg] (Kg = 1 for a scalar decay, K per key channel) -> [..., C, C, Kg] holding
    exp(g_{j+1} + ... + g_i) at (j, i) for j <= i, and 0 for j > i. A scalar decay's entries each sum
    only their own segment: never a difference of two long prefix sums, which would lose the small decays'
    precision. Per-channel decays run in chunks of at most CHANNEL_DECAY_CHUNK steps, where the difference
    of two in-chunk prefix sums loses at most a few ulps of an 8-term sum, and takes a third of the passes
    over the [C, C, K] table; its entries below sqrt(smallest normal) are held there (products of two stay
    normal numbers, see `flushed_exp`) rather than flushed to 0.
    """
    size = g.shape[-2]
    upper = torch.ones(size, size, dtype=torch.bool, device=g.device).triu()
    if g.shape[-1] > 1:
        cum = g.cumsum(-2)
        floor = math.log(torch.finfo(g.dtype).tiny) / 2
        segments = cum[..., None, :, :] - cum[..., :, None, :]  # (j, i): G_i - G_j
        return torch.exp(segments.clamp_(floor, 0)) * upper[..., None]
    segments = (g[..., None, :, :] * upper.triu(1)[..., None]).cumsum(-2)  # (j, i): g_m summed over j < m <= i
    return flushed_exp(segments, upper[..., None])


def per_channel_heads(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, group: int):
    """(q, k, group) for decays g [B, T, HV, Kg]: per-channel decays are per value head, so q and k
    [B, T, H, K] are then read per value head (group 1); a scalar decay keeps them grouped."""
    if g.shape[-1] > 1 and group > 1:
        return q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2), 1
    return q, k, group


def chunk_decays(g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A chunked log decay g [N, BH, C, Kg] -> (pairwise [N, BH, C(j), C(i), Kg] as `segment_decay`,
    log decay summed from the chunk start [N, BH, C, Kg], its exp (from the chunk start to step i),
    decay from step j to the chunk end [N, BH, C, Kg], decay across the chunk per state row [N, BH, Kg, 1])."""
    pairwise, cum = segment_decay(g), g.cumsum(-2)
    decay_in = flushed_exp(cum)
    return pairwise, cum, decay_in, pairwise[..., -1, :], decay_in[..., -1:, :].mT


def decayed_scores(targets: torch.Tensor, sources: torch.Tensor, decay: torch.Tensor, group: int = 1) -> torch.Tensor:
    """sum_k targets_ik sources_jk decay_jik at (j, i): [.., C, K] x [.., C, K] x [.., C, C, Kg] -> [.., C, C].

    A scalar decay (Kg = 1) is one matmul and a product; with `group` > 1 the decay has `group`
    value heads per row of targets / sources ([N, B*H*group, ..] against [N, B*H, ..]).
    Per-channel decays (Kg = K) take `group` 1.
    """
    if decay.shape[-1] == 1:
        products = sources @ targets.mT  # [.., j, i]
        return (decay[..., 0].unflatten(1, (-1, group)) * products[:, :, None]).flatten(1, 2)
    return (decay * targets[..., None, :, :]).mul_(sources[..., :, None, :]).sum(-1)


def per_value_head(x: torch.Tensor, y: torch.Tensor, group: int) -> torch.Tensor:
    """x [N, B*HV, ..] times y [N, B*H, ..], value head j reading key head j // group."""
    return (x.unflatten(1, (-1, group)) * y[:, :, None]).flatten(1, 2)
