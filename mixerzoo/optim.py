"""AdamW parameter groups as the field forms them (GPT-2, fla, mamba_ssm): weight decay on the
matrices only; none on embeddings, norm weights, biases, or the recurrent mixers' dynamics
parameters (A_log, dt_bias, D), nor on any parameter marked `_no_weight_decay` (fla's and
mamba_ssm's mark, honoured for plugin mixers)."""

from __future__ import annotations

from torch import nn

NO_WEIGHT_DECAY = "_no_weight_decay"


def decays(parameter: nn.Parameter, embeddings: set[int]) -> bool:
    """Whether `parameter` takes weight decay: a matrix (2+ dims) that is neither an embedding
    table (ids in `embeddings`) nor marked `_no_weight_decay`."""
    return parameter.ndim >= 2 and id(parameter) not in embeddings and not getattr(parameter, NO_WEIGHT_DECAY, False)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups over `model`'s trainable parameters (a tied head counts once, as the
    embedding): [{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0}],
    empty groups left out."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if decays(p, embeddings)], "weight_decay": weight_decay},
        {"params": [p for p in trainable if not decays(p, embeddings)], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
