"""MQAR: multi-query associative recall (Arora et al., "Zoology", 2023), generator, training and evaluation.

An example of length T with n key-value pairs over a vocabulary V:

    k1 v1 k2 v2 ... kn vn  0 0 k2 0 0 0 k1 ... 0      inputs
    -100 ....................... v2 ......  v1 ... -100  labels

* keys are distinct tokens from [1, V/2), values are distinct tokens from [V/2, V);
* the 2n-token prefix lists the pairs; each key is then queried once, at a distinct
  position of the remaining T - 2n positions, drawn by a power law over the distance d
  from the prefix (P(d) proportional to d^(a-1), a = 0.01: mostly near, sometimes far);
* at a query position the input is the key and the label is its value, so the logits at
  position t predict labels[t] (no shift); every other position is filler token 0 (never a
  key: keys start at 1) with label -100 (ignored by cross entropy).
"""

from __future__ import annotations

from typing import Literal, Self

import torch
from pydantic import Field, model_validator

from mixerzoo.blocks import Decoder
from mixerzoo.tasks.loop import IGNORE, answer_accuracy, fit
from mixerzoo.errors import StrictModel

FILLER = 0


class MQARConfig(StrictModel):
    """Shape of an MQAR example: vocabulary, sequence length, number of pairs, query power law."""

    vocab_size: int = Field(gt=0, description="tokens 0..V-1: 0 filler, [1, V/2) keys, [V/2, V) values")
    seq_len: int = Field(gt=0, description="tokens per example, prefix and queries included")
    n_pairs: int = Field(gt=0, description="key-value pairs per example, each queried once")
    power_a: float = Field(0.01, gt=0, le=1, description="query distance d from the prefix has P(d) ~ d^(a-1)")

    @model_validator(mode="after")
    def _fits(self) -> Self:
        """The pairs and queries fit in the sequence; the vocabulary holds n distinct keys and values."""
        if self.seq_len < 4 * self.n_pairs:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= 4 * n_pairs ({4 * self.n_pairs}): the "
                             f"{2 * self.n_pairs}-token kv prefix must leave at least as many positions for queries")
        n_keys, n_values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if min(n_keys, n_values) < self.n_pairs:
            raise ValueError(f"vocab_size {self.vocab_size} has {n_keys} keys [1, {self.vocab_size // 2}) and "
                             f"{n_values} values [{self.vocab_size // 2}, {self.vocab_size}); n_pairs "
                             f"({self.n_pairs}) needs that many distinct of each: use vocab_size >= "
                             f"{2 * self.n_pairs + 2}")
        return self


def chance_accuracy(vocab_size: int) -> float:
    """Accuracy of guessing a value uniformly: 1 / the number of value tokens [V/2, V)."""
    return 1 / (vocab_size - vocab_size // 2)


def distinct_tokens(n_rows: int, low: int, high: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[n_rows, k] long: k distinct tokens from [low, high) per row, uniformly at random."""
    return torch.rand(n_rows, high - low, generator=generator).argsort(dim=1)[:, :k] + low


def make_mqar(config: MQARConfig, n_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_examples` MQAR examples -> (inputs [N, T] long, labels [N, T] long); the same seed gives the same data."""
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    generator = torch.Generator().manual_seed(seed)
    n, half, length = config.n_pairs, config.vocab_size // 2, config.seq_len
    keys = distinct_tokens(n_examples, 1, half, n, generator)
    values = distinct_tokens(n_examples, half, config.vocab_size, n, generator)

    inputs = torch.full((n_examples, length), FILLER, dtype=torch.long)
    labels = torch.full((n_examples, length), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * n:2], inputs[:, 1:2 * n:2] = keys, values

    # Query slots: distinct distances d = 1..R after the prefix, P(d) ~ d^(a-1); pair i goes to a random slot.
    remaining = length - 2 * n
    weights = torch.arange(1, remaining + 1, dtype=torch.float64) ** (config.power_a - 1)
    slots = torch.multinomial(weights.expand(n_examples, remaining), n, replacement=False, generator=generator)
    slots = slots.gather(1, torch.rand(n_examples, n, generator=generator).argsort(dim=1))
    positions = 2 * n + slots
    inputs.scatter_(1, positions, keys)
    labels.scatter_(1, positions, values)
    return inputs, labels


def train_mqar(
    model: Decoder,
    config: MQARConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.1,
    schedule: Literal["cosine", "constant"] = "cosine",
    grad_clip: float = 1.0,
    warmup_steps: int = 0,
) -> dict:
    """Train `model` in place on fresh MQAR batches (data seeded by `seed`) with AdamW and full-sequence
    forwards `model(inputs)`; returns {"losses": per-step losses, "initial_loss", "final_loss" (mean of
    the last tenth of the steps), "steps", "seconds"}."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    inputs, labels = make_mqar(config, steps * batch_size, seed)

    def batch(step: int) -> dict[str, torch.Tensor]:
        rows = slice(step * batch_size, (step + 1) * batch_size)
        return {"input_ids": inputs[rows], "labels": labels[rows]}

    return fit(model, batch, steps=steps, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, schedule=schedule,
               warmup_steps=warmup_steps)


def value_distances(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Tokens from each queried pair's value to its query, over MQAR examples inputs, labels [N, T]
    -> [Q] long (Q query positions in all; the value's position is that of the label's token in the prefix)."""
    rows, query_positions = (labels != IGNORE).nonzero(as_tuple=True)
    value_positions = (inputs[rows] == labels[rows, query_positions][:, None]).long().argmax(dim=1)
    return query_positions - value_positions


def evaluate_mqar(model: Decoder, config: MQARConfig, n_examples: int, seed: int, *, batch_size: int = 256) -> float:
    """Fraction of query positions of `n_examples` fresh examples (seeded by `seed`) where argmax logits == label."""
    inputs, labels = make_mqar(config, n_examples, seed)
    return answer_accuracy(model, ({"input_ids": inputs[start:start + batch_size], "labels": labels[start:start + batch_size]}
                                   for start in range(0, n_examples, batch_size)))
