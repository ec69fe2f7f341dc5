"""Training: InfiniteVL's stages (layer-wise and end-to-end distillation, SFT, long-sequence SFT
with packing and LoRA) for any student and teacher, one loop, runnable under torchrun."""

from mixerzoo.train.config import DataConfig, LoRAConfig, ModelSource, OptimConfig, TrainConfig
from mixerzoo.train.data import ByteTokenizer, Example, JSONLDataset, TensorDataset, build_dataset, collate
from mixerzoo.train.loop import distill_layers, distill_logits, long_sft, run_stage, sft, train
from mixerzoo.train.models import build_model, load_model, save_model
from mixerzoo.train.params import LoRALinear, apply_freezing, apply_lora, fold_lora, parameter_groups

__all__ = [
    "ByteTokenizer", "DataConfig", "Example", "JSONLDataset", "LoRAConfig", "LoRALinear", "ModelSource", "OptimConfig",
    "TensorDataset", "TrainConfig", "apply_freezing", "apply_lora", "build_dataset", "build_model", "collate",
    "distill_layers", "distill_logits", "fold_lora", "load_model", "long_sft", "parameter_groups",
    "run_stage", "save_model", "sft", "train",
]
