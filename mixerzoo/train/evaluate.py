"""Task accuracy of a trained model on held-out examples."""

from __future__ import annotations

from torch import nn

from mixerzoo.tasks.loop import answer_accuracy
from mixerzoo.train.data import Dataset, collate


def token_accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 32) -> float:
    """Fraction of labelled positions of `dataset` where the argmax of the logits equals the label."""
    return answer_accuracy(model, (collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                                   for start in range(0, len(dataset), batch_size)))
