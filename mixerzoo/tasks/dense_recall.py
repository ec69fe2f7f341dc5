"""Dense recall: how many key-value pairs a model holds at once, against how far back they lie.

An example of `n` pairs, `gap` filler tokens and length T over a vocabulary V:

    k1 v1 k2 v2 ... kn vn  0 ... 0  k3 k1 ... k2  0 ... 0      inputs
    -100 ...................-100    v3 v1 ... v2  -100 ...     labels
    |-- 2n pairs ------|  |- gap -|  |- n queries -|  |- pad -|

* keys are distinct tokens from [1, V/2), values distinct tokens from [V/2, V), as in MQAR
  (mixerzoo.tasks.mqar), and every key is queried once, in random order, right after the gap;
* the logits at a query position predict its label (the key's value), no shift;
* the density is n, the number of pairs that must be held when the queries start; the gap
  sets the distance: the tokens from pair i's value to its query are (2n - 2i - 1) + gap + j
  for query rank j, so with gap 0 every distance is at most 3n - 2 (all inside a window of
  W > 3n - 2 tokens) and with gap >= W - 1 every distance is at least W (all past it).
"""

from __future__ import annotations

from typing import Self

import torch
from pydantic import Field, model_validator

from mixerzoo.errors import StrictModel
from mixerzoo.tasks.loop import IGNORE
from mixerzoo.tasks.mqar import FILLER, _distinct


class DenseRecallConfig(StrictModel):
    """Shape of a dense-recall example: vocabulary, pairs held at once, filler gap, padded length."""

    vocab_size: int = Field(gt=0, description="tokens 0..V-1: 0 filler, [1, V/2) keys, [V/2, V) values")
    n_pairs: int = Field(gt=0, description="key-value pairs listed before the queries (the density)")
    gap: int = Field(ge=0, description="filler tokens between the last pair and the first query (the distance)")
    seq_len: int = Field(gt=0, description="tokens per example, padded with filler after the queries")

    @model_validator(mode="after")
    def _fits(self) -> Self:
        """The pairs, gap and queries fit in the sequence; the vocabulary holds n distinct keys and values."""
        needed = 3 * self.n_pairs + self.gap
        if self.seq_len < needed:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 3 * n_pairs + gap ({needed})")
        n_keys, n_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if min(n_keys, n_values) < self.n_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} has {n_keys} keys and {n_values} values; n_pairs "
                             f"({self.n_pairs}) needs that many distinct of each: use vocab_size >= {2 * self.n_pairs + 2}")
        return self

    def distance_range(self) -> tuple[int, int]:
        """Smallest and largest number of tokens from a pair's value to its query."""
        return self.gap + 1, 3 * self.n_pairs - 2 + self.gap


def make_dense_recall(config: DenseRecallConfig, n_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_examples` examples -> (inputs [N, T] long, labels [N, T] long); the same seed gives the same data."""
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    generator = torch.Generator().manual_seed(seed)
    n, half = config.n_pairs, config.vocab_size // 2
    keys = _distinct(n_examples, 1, half, n, generator)  # [N, n]
    values = _distinct(n_examples, half, config.vocab_size, n, generator)  # [N, n]
    order = torch.rand(n_examples, n, generator=generator).argsort(dim=1)  # query j asks pair order[:, j]

    inputs = torch.full((n_examples, config.seq_len), FILLER, dtype=torch.long)
    labels = torch.full((n_examples, config.seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values
    start = 2 * n + config.gap
    inputs[:, start:start + n] = keys.gather(1, order)
    labels[:, start:start + n] = values.gather(1, order)
    return inputs, labels
