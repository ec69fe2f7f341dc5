"""The four training stages as losses. A stage's loss is a set of terms, each a sum over a batch
and the count it is averaged by; counts are known before the forward, so a step averages each
term over the whole global batch (all micro-batches of all processes) exactly.

- distill-layers: teacher forcing: each created student layer gets the teacher layer's input
  hidden states and is trained with MSE to the teacher layer's output.
- distill-logits: KL between student and teacher logits at temperature T, scaled by T^2, over
  every real token; optionally plus a weighted per-layer MSE of the created layers' outputs.
- sft / long-sft: cross entropy on the labelled (answer) tokens.
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn.functional as F
from torch import nn

from mixerzoo.tasks.loop import IGNORE, task_logits
from mixerzoo.train.config import TrainConfig
from mixerzoo.train.models import decoder_of
from mixerzoo.train.params import created_layers

Batch = dict[str, torch.Tensor]
Terms = dict[str, torch.Tensor]


@contextlib.contextmanager
def capture_layers(model: nn.Module, layers: set[int]):
    """Record each listed decoder block's call while the context is open: a dict filled with
    index -> (input hidden [B, T, d], keyword arguments, output hidden [B, T, d])."""
    records: dict[int, tuple] = {}
    handles = []
    for i, block in enumerate(decoder_of(model).layers):
        if i in layers:
            def hook(module, args, kwargs, output, i=i):
                records[i] = (args[0], kwargs, output[0])
            handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _squared_error(output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences over real tokens; output, target [B, T, d], valid [B, T]."""
    return ((output.float() - target.float()) ** 2 * valid[..., None]).sum()


def _kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float, direction: str) -> torch.Tensor:
    """Sum over real tokens of KL at `temperature` (scaled by T^2); logits [B, T, V]."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if direction == "student||teacher":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    return temperature**2 * (per_token * valid).sum()


class StageLoss(nn.Module):
    """The trained model with its stage's loss: forward(batch) -> term sums. Wrapping the whole
    computation in one module lets DDP and FSDP2 see every trained call through their root."""

    def __init__(self, config: TrainConfig, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # a list: not a submodule (never wrapped, never trained)
        self.stage, self.temperature = config.stage, config.temperature
        self.kl_direction, self.layer_mse_weight = config.kl_direction, config.layer_mse_weight
        self.created = sorted(created_layers(student, teacher)) if teacher is not None else []
        if config.stage == "distill-layers" and not self.created:
            raise ValueError("distill-layers: student and teacher have the same mixer in every layer; nothing to distill")
        self.d_model = decoder_of(student).spec.d_model

    @property
    def weights(self) -> dict[str, float]:
        """Each term's weight in the total loss."""
        if self.stage == "distill-layers":
            return {"layer_mse": 1.0}
        if self.stage == "distill-logits":
            return {"kl": 1.0, **({"layer_mse": self.layer_mse_weight} if self.layer_mse_weight else {})}
        return {"ce": 1.0}

    def counts(self, batch: Batch) -> dict[str, int]:
        """What each term of `batch` is averaged by (known before the forward)."""
        tokens = int(batch["valid"].sum())
        counts = {"ce": int((batch["labels"] != IGNORE).sum()), "kl": tokens,
                  "layer_mse": tokens * self.d_model * len(self.created)}
        return {k: counts[k] for k in self.weights}

    def forward(self, batch: Batch) -> Terms:
        """Sum of each term over `batch`."""
        teacher = self._teacher[0]
        if self.stage == "distill-layers":
            with torch.no_grad(), capture_layers(teacher, set(self.created)) as taught:
                task_logits(teacher, batch)
            blocks = decoder_of(self.student).layers
            total = sum(_squared_error(blocks[i](x, None, **kwargs)[0], target, batch["valid"])
                        for i, (x, kwargs, target) in taught.items())
            return {"layer_mse": total}
        if self.stage == "distill-logits":
            layers = set(self.created) if "layer_mse" in self.weights else set()
            with torch.no_grad(), capture_layers(teacher, layers) as taught:
                teacher_logits = task_logits(teacher, batch)
            with capture_layers(self.student, layers) as learnt:
                logits = task_logits(self.student, batch)
            terms = {"kl": _kl(logits, teacher_logits, batch["valid"], self.temperature, self.kl_direction)}
            if layers:
                terms["layer_mse"] = sum(_squared_error(learnt[i][2], taught[i][2], batch["valid"]) for i in layers)
            return terms
        logits = task_logits(self.student, batch)
        return {"ce": F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                      ignore_index=IGNORE, reduction="sum")}


def total_loss(terms: Terms, weights: dict[str, float], counts: dict[str, float]) -> torch.Tensor:
    """sum_k weight_k * sum_k / count_k (a term with count 0 contributes 0)."""
    return sum(w * terms[k] / max(counts[k], 1) for k, w in weights.items())

