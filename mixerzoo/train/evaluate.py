"""Task accuracy of a trained model on held-out examples."""

from __future__ import annotations

import torch
from torch import nn

from mixerzoo.tasks.loop import IGNORE
from mixerzoo.train.data import Dataset, collate
from mixerzoo.train.models import model_forward


@torch.no_grad()
def token_accuracy(model: nn.Module, dataset: Dataset, *, batch_size: int = 32) -> float:
    """Fraction of labelled positions where the argmax of the logits equals the label."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        labelled = batch["labels"] != IGNORE
        predicted = model_forward(model, batch).argmax(-1)
        correct += int((predicted[labelled] == batch["labels"][labelled]).sum())
        total += int(labelled.sum())
    model.train(was_training)
    if total == 0:
        raise ValueError("token_accuracy: the dataset has no labelled positions")
    return correct / total
