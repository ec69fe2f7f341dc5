"""Parameter groups, freezing policies and LoRA adapters."""

from __future__ import annotations

import math

import torch
from torch import nn

from mixerzoo.train.config import GROUPS, LoRAConfig
from mixerzoo.train.models import decoder_of


def created_layers(student: nn.Module, teacher: nn.Module | None) -> set[int]:
    """Decoder layers whose mixer type differs from the teacher's layer at the same index:
    the layers a conversion created (all layers when there is no teacher to compare with)."""
    layers = decoder_of(student).layers
    if teacher is None:
        return set(range(len(layers)))
    theirs = decoder_of(teacher).layers
    if len(theirs) != len(layers):
        raise ValueError(f"student has {len(layers)} decoder layers, the teacher {len(theirs)}")
    return {i for i, (a, b) in enumerate(zip(layers, theirs)) if a.mixer.config.type != b.mixer.config.type}


def parameter_groups(model: nn.Module, teacher: nn.Module | None = None) -> dict[str, set[str]]:
    """Parameter names in each group: vision, merger, embeddings, mlp, norms, lora, one group per
    mixer type ("attention", "gated_deltanet", ...), created (mixers the conversion made) and all."""
    prefix = "decoder." if hasattr(model, "decoder") else ""
    created = created_layers(model, teacher)
    layers = decoder_of(model).layers
    groups: dict[str, set[str]] = {name: set() for name in GROUPS}
    for name, _ in model.named_parameters():
        groups["all"].add(name)
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            groups["lora"].add(name)
            continue
        if name.startswith("visual.merger."):
            groups["merger"].add(name)
        elif name.startswith("visual."):
            groups["vision"].add(name)
        elif name.startswith((f"{prefix}embed.", f"{prefix}lm_head.")):
            groups["embeddings"].add(name)
        elif name.startswith(f"{prefix}layers."):
            _, index, part = name[len(prefix):].split(".")[:3]  # layers.{index}.{part}...
            index = int(index)
            if part == "mixer":
                groups.setdefault(layers[index].mixer.config.type, set()).add(name)
                if index in created:
                    groups["created"].add(name)
            elif part == "mlp":
                groups["mlp"].add(name)
            else:
                groups["norms"].add(name)
        else:
            groups["norms"].add(name)
    return groups


def apply_freezing(model: nn.Module, train: list[str], teacher: nn.Module | None = None) -> list[str]:
    """Set requires_grad: parameters in the named groups train, all others freeze. Returns the
    trainable names; an unknown group or a policy that trains nothing is an error."""
    groups = parameter_groups(model, teacher)
    unknown = [g for g in train if g not in groups]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}; groups of this model: {sorted(groups)}")
    trainable = set().union(*(groups[g] for g in train))
    if not trainable:
        raise ValueError(f"the groups {train} hold no parameters of this model")
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return sorted(trainable)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: base(x) + (alpha / r) * B(A(x)), B zero-initialised."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap the decoder's Linear modules named in config.targets with LoRALinear; returns their paths."""
    wrapped = []
    for path, module in list(decoder_of(model).named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in config.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, config.rank, config.alpha))
                wrapped.append(f"{path}.{child_name}" if path else child_name)
    if not wrapped:
        raise ValueError(f"lora.targets {config.targets} match no Linear module of the decoder")
    return wrapped


def fold_lora(state: dict[str, torch.Tensor], config: LoRAConfig) -> dict[str, torch.Tensor]:
    """A state dict with every adapted Linear's base weight + (alpha / r) B A stored as the plain
    Linear's weight (the keys of the model without adapters)."""
    scale = config.alpha / config.rank
    folded = {}
    for name, tensor in state.items():
        path, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if path.endswith(".base") and f"{path[:-5]}.lora_A" in state:
            adapted = path[:-5]
            if leaf == "weight":
                tensor = tensor + scale * state[f"{adapted}.lora_B"] @ state[f"{adapted}.lora_A"]
            name = f"{adapted}.{leaf}"
        folded[name] = tensor
    return folded
