"""Packed sequences: several documents in one row, each mixed as if it ran alone.

`PackedLayout.from_documents(documents)` reads document ids [B, T] (non-decreasing along a
row over its real tokens, -1 on padding) and maps every (row, document) segment to a row of an
unpacked, right-padded batch [N_segments, L_max]. A mixer's `forward_packed` unpacks, runs its
ordinary forward from a fresh state with the pads marked invalid, and packs the output back; the
protocol's padding invariance makes that exactly "each document alone", for every mixer.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each real token of a packed [B, T] batch sits in the unpacked [N, L] batch."""

    shape: tuple[int, int]  # (B, T) of the packed batch
    tokens: torch.Tensor  # [B, T] bool: the real (non-padding) tokens
    segment: torch.Tensor  # [n_real] long: unpacked row of each real token, in row-major order
    offset: torch.Tensor  # [n_real] long: its index within the document
    n_segments: int
    max_length: int

    @classmethod
    def from_documents(cls, documents: torch.Tensor) -> "PackedLayout":
        """The layout of document ids [B, T] (int, -1 on padding, non-decreasing over real tokens)."""
        if documents.dim() != 2 or documents.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"documents must be an integer tensor [B, T], got {documents.dtype} {list(documents.shape)}")
        if (documents < -1).any():
            raise ValueError("documents: ids must be >= 0, or -1 for padding")
        tokens = documents >= 0
        rows = torch.arange(documents.shape[0], device=documents.device)[:, None].expand_as(documents)
        row_of, doc_of = rows[tokens], documents[tokens].long()  # [n_real] in row-major order
        same_row = row_of[1:] == row_of[:-1]
        if (same_row & (doc_of[1:] < doc_of[:-1])).any():
            raise ValueError("documents: ids must be non-decreasing along each row (a document is contiguous)")
        starts = torch.ones_like(row_of, dtype=torch.bool)
        starts[1:] = ~same_row | (doc_of[1:] != doc_of[:-1])
        segment = starts.long().cumsum(0) - 1
        first = torch.nonzero(starts).flatten()  # [N] index of each segment's first token
        offset = torch.arange(row_of.numel(), device=documents.device) - first[segment]
        n_segments = int(first.numel())
        max_length = int(offset.max()) + 1 if n_segments else 0
        return cls(tuple(documents.shape), tokens, segment, offset, n_segments, max_length)

    @property
    def valid(self) -> torch.Tensor:
        """[N, L] bool: the real tokens of the unpacked batch."""
        valid = torch.zeros(self.n_segments, self.max_length, dtype=torch.bool, device=self.tokens.device)
        valid[self.segment, self.offset] = True
        return valid

    @property
    def positions(self) -> torch.Tensor:
        """[B, T] long: each token's index within its document (0 on padding)."""
        positions = torch.zeros(self.shape, dtype=torch.long, device=self.tokens.device)
        positions[self.tokens] = self.offset
        return positions

    def unpack(self, packed: torch.Tensor, *, lead: int = 0) -> torch.Tensor:
        """[*lead, B, T, *rest] -> [*lead, N, L, *rest], zeros at pads (lead: 1 for M-RoPE's [3, B, T])."""
        if tuple(packed.shape[lead:lead + 2]) != self.shape:
            raise ValueError(f"a packed tensor of shape {list(packed.shape)} does not match documents "
                             f"{list(self.shape)} after {lead} leading dim(s)")
        out = packed.new_zeros((*packed.shape[:lead], self.n_segments, self.max_length, *packed.shape[lead + 2:]))
        index = (slice(None),) * lead
        out[index + (self.segment, self.offset)] = packed[index + (self.tokens,)]
        return out

    def pack(self, unpacked: torch.Tensor, *, lead: int = 0) -> torch.Tensor:
        """[*lead, N, L, *rest] -> [*lead, B, T, *rest], zeros at padding: the inverse of `unpack`."""
        out = unpacked.new_zeros((*unpacked.shape[:lead], *self.shape, *unpacked.shape[lead + 2:]))
        index = (slice(None),) * lead
        out[index + (self.tokens,)] = unpacked[index + (self.segment, self.offset)]
        return out
