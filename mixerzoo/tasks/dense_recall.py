"""Dense recall: how many key-value pairs a model holds at once, against how far back they lie.

An example of `n` pairs, `gap` filler tokens, q queries and length T over a vocabulary V:

    k1 v1 k2 v2 ... kn vn  0 ... 0  k3 k1 ... k7  0 ... 0      inputs
    -100 ...................-100    v3 v1 ... v7  -100 ...     labels
    |-- 2n pairs ------|  |- gap -|  |- q queries -|  |- pad -|

* keys are distinct tokens from [1, V/2), values distinct tokens from [V/2, V), as in MQAR
  (mixerzoo.tasks.mqar); q distinct keys, drawn at random (every key when q = n), are queried
  in random order right after the gap;
* the logits at a query position predict its label (the key's value), no shift;
* the density is n, the number of pairs that must be held when the queries start (any may be
  asked); the gap sets the distance: the tokens from pair i's value to a query at rank j are
  (2n - 2i - 1) + gap + j, so with gap 0 every distance is at most 2n + q - 2 (all inside a
  window of W > 2n + q - 2 tokens) and with gap >= W - 1 every distance is at least W (all past it).
"""

from __future__ import annotations

from typing import Self

import torch
from pydantic import Field, model_validator

from mixerzoo.errors import StrictModel
from mixerzoo.tasks.loop import IGNORE
from mixerzoo.tasks.mqar import FILLER, distinct_tokens


class DenseRecallConfig(StrictModel):
    """Shape of a dense-recall example: vocabulary, pairs held at once, filler gap, padded length."""

    vocab_size: int = Field(gt=0, description="tokens 0..V-1: 0 filler, [1, V/2) keys, [V/2, V) values")
    n_pairs: int = Field(gt=0, description="key-value pairs listed before the queries (the density)")
    gap: int = Field(ge=0, description="filler tokens between the last pair and the first query (the distance)")
    seq_len: int = Field(gt=0, description="tokens per example, padded with filler after the queries")
    n_queries: int | None = Field(None, gt=0, description="keys queried per example (distinct, at random); "
                                  "None: every key")

    @model_validator(mode="after")
    def _fits(self) -> Self:
        """The pairs, gap and queries fit in the sequence; the vocabulary holds n distinct keys and values."""
        if self.n_queries is not None and self.n_queries > self.n_pairs:
            raise ValueError(f"n_queries ({self.n_queries}) must be <= n_pairs ({self.n_pairs}): each key is asked once")
        needed = 2 * self.n_pairs + self.queries + self.gap
        if self.seq_len < needed:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 2 * n_pairs + queries + gap ({needed})")
        n_keys, n_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if min(n_keys, n_values) < self.n_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} has {n_keys} keys and {n_values} values; n_pairs "
                             f"({self.n_pairs}) needs that many distinct of each: use vocab_size >= {2 * self.n_pairs + 2}")
        return self

    @property
    def queries(self) -> int:
        """Keys queried per example."""
        return self.n_pairs if self.n_queries is None else self.n_queries

    def distance_range(self) -> tuple[int, int]:
        """Bounds on the number of tokens from a queried pair's value to its query."""
        return self.gap + 1, 2 * self.n_pairs + self.queries - 2 + self.gap


def make_dense_recall(config: DenseRecallConfig, n_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_examples` examples -> (inputs [N, T] long, labels [N, T] long); the same seed gives the same data."""
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    generator = torch.Generator().manual_seed(seed)
    n, half = config.n_pairs, config.vocab_size // 2
    keys = distinct_tokens(n_examples, 1, half, n, generator)  # [N, n]
    values = distinct_tokens(n_examples, half, config.vocab_size, n, generator)  # [N, n]
    q = config.queries
    order = torch.rand(n_examples, n, generator=generator).argsort(dim=1)[:, :q]  # query j asks pair order[:, j]

    inputs = torch.full((n_examples, config.seq_len), FILLER, dtype=torch.long)
    labels = torch.full((n_examples, config.seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values
    start = 2 * n + config.gap
    inputs[:, start:start + q] = keys.gather(1, order)
    labels[:, start:start + q] = values.gather(1, order)
    return inputs, labels
