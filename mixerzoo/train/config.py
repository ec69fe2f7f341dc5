"""Training configs: one validated pydantic model per YAML file (`extra="forbid"` everywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, model_validator
from typing_extensions import Self

from mixerzoo.errors import StrictModel, read_yaml

Stage = Literal["distill-layers", "distill-logits", "sft", "long-sft"]
STAGES: tuple[str, ...] = get_args(Stage)

# Parameter groups a freezing policy may name (see mixerzoo.train.params.parameter_groups).
# Mixer types ("attention", "gated_deltanet", "mamba2", plugins) are groups too.
GROUPS = ("all", "created", "vision", "merger", "embeddings", "mlp", "norms", "lora")

# What each stage trains unless the config says otherwise (InfiniteVL's recipe: the layers the
# conversion created, then attention too for SFT; MLPs, vision and embeddings stay frozen).
DEFAULT_TRAIN = {
    "distill-layers": ["created"],
    "distill-logits": ["created"],
    "sft": ["created", "attention"],
    "long-sft": ["created", "attention"],
}


class ModelSource(StrictModel):
    """Where a model comes from: a saved checkpoint, a fresh recipe, or a conversion of the teacher."""

    checkpoint: Path | None = Field(None, description="a file written by mixerzoo.train.save_model")
    recipe: str | None = Field(None, description="a registered recipe name (fresh random weights, or the target of convert)")
    size: str = Field("tiny", description="recipe size")
    vlm: bool = Field(True, description="build the recipe as a VLM (vision tower + decoder) rather than a Decoder LM")
    convert_from_teacher: bool = Field(
        False, description="build `recipe`'s layout from the teacher: copied weights, new mixers initialised")
    window: int | None = Field(None, gt=0, description="sliding window of converted attention layers "
                               "(default: the recipe's window at `size`)")
    seed: int = Field(0, description="seed of fresh random weights")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.checkpoint is None) == (self.recipe is None):
            raise ValueError("give exactly one of `checkpoint` and `recipe`")
        if self.convert_from_teacher and self.recipe is None:
            raise ValueError("convert_from_teacher needs `recipe` (the target layout)")
        return self


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio` x lr."""

    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decay ends at lr x this")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null: no clipping")


class DataConfig(StrictModel):
    """The examples: a synthetic task or a JSONL file, and how they are batched."""

    source: Literal["mqar", "visual-recall", "stdlib-text", "jsonl"] = Field(
        description="the examples: mqar or visual-recall (synthetic), stdlib-text (random byte windows of the Python "
                    "standard library's source, the `lm` study's corpus: task {seq_len, split}) or jsonl (a file)")
    path: Path | None = Field(None, description="the JSONL file (source: jsonl)")
    images_anywhere: bool = Field(False, description="jsonl: allow image paths outside the file's folder")
    tokenizer: str = Field("bytes", description='"bytes" (UTF-8 bytes as ids) or a Hugging Face tokenizer path')
    task: dict = Field(default_factory=dict, description="the synthetic task's config fields")
    n_examples: int = Field(1024, gt=0, description="synthetic examples (or text windows) generated")
    seed: int = Field(0, description="seed of the synthetic examples (or of the text windows' places)")
    pack: bool = Field(False, description="pack examples into rows of max_length, states reset per document")
    max_length: int | None = Field(None, gt=0, description="row length when packing; longer examples are an error")

    @model_validator(mode="after")
    def _fields_fit(self) -> Self:
        if (self.source == "jsonl") != (self.path is not None):
            raise ValueError("`path` is required for source 'jsonl' and only for it")
        if self.pack and self.max_length is None:
            raise ValueError("pack: true needs max_length")
        return self


class LoRAConfig(StrictModel):
    """Low-rank adapters on the named Linear projections of the decoder."""

    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                               description="Linear module names (last path component) that get adapters")
    rank: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator (the update is scaled by alpha / rank)")


class TrainConfig(StrictModel):
    """One stage of training: models, data, optimisation, freezing, checkpoints."""

    stage: Stage = Field(description="the training stage (distill-layers, distill-logits, sft, long-sft)")
    out_dir: Path = Field(description="where checkpoints, metrics.jsonl and the final model go")
    student: ModelSource = Field(description="the model that trains")
    teacher: ModelSource | None = Field(None, description="the model distilled from (distill stages)")
    data: DataConfig = Field(description="the training examples")
    optim: OptimConfig = Field(OptimConfig(), description="the optimiser and its schedule")
    steps: int = Field(gt=0, description="optimiser steps")
    micro_batch_size: int = Field(8, gt=0, description="examples per forward on one process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimiser step on one process")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="autocast dtype of forwards")
    train: list[str] | None = Field(None, description="parameter groups that train (others frozen); default per stage")
    lora: LoRAConfig | None = Field(None, description="train LoRA adapters on these projections instead of the weights")
    temperature: float = Field(2.0, gt=0, description="distill-logits: softmax temperature T (loss scaled by T^2)")
    kl_direction: Literal["student||teacher", "teacher||student"] = Field(
        "student||teacher", description="distill-logits: which KL; teacher||student is the forward KL of Hinton et al.")
    layer_mse_weight: float = Field(0.0, ge=0, description="distill-logits: weight of the optional per-layer MSE term")
    restart_if_damaged: bool = Field(False, description="when every checkpoint in out_dir is damaged, train again "
                                                       "from step 0 (default: stop with an error)")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints (resumable)")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints kept on disk (oldest deleted)")
    log_every: int = Field(1, gt=0, description="steps between metrics.jsonl lines")
    seed: int = Field(0, description="seed of the data order and of anything random in training")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="auto: ddp under torchrun with several processes, else none")
    progress: bool = Field(True, description="show a progress bar")

    @model_validator(mode="after")
    def _stage_needs(self) -> Self:
        if self.stage.startswith("distill") and self.teacher is None:
            raise ValueError(f"stage {self.stage!r} needs a teacher")
        if self.student.convert_from_teacher and self.teacher is None:
            raise ValueError("student.convert_from_teacher needs a teacher")
        if self.lora is not None and self.stage != "long-sft":
            raise ValueError(f"lora is a long-sft option, not {self.stage!r}")
        if self.stage == "long-sft" and not self.data.pack:
            raise ValueError("long-sft packs sequences: set data.pack: true and data.max_length")
        return self

    def checkpoint_sources(self) -> dict[str, Path]:
        """The checkpoint file of each model source that reads one: role ("student", "teacher") -> path."""
        sources = {"student": self.student, "teacher": self.teacher}
        return {role: s.checkpoint for role, s in sources.items() if s is not None and s.checkpoint is not None}

    @property
    def train_groups(self) -> list[str]:
        """The parameter groups that train in this stage."""
        if self.train is not None:
            return self.train
        return ["lora"] if self.lora is not None else DEFAULT_TRAIN[self.stage]


def check_checkpoints_exist(config: TrainConfig, config_dir: Path | None = None) -> None:
    """Raise FileNotFoundError if a model source's checkpoint is missing, saying which command
    writes it when a YAML in `config_dir` (the config's folder) trains into its folder."""
    for role, checkpoint in config.checkpoint_sources().items():
        if checkpoint.is_file():
            continue
        hint = ""
        for other in sorted(config_dir.glob("*.y*ml")) if config_dir is not None else []:
            try:
                data = read_yaml(other)
            except ValueError:
                continue
            if isinstance(data, dict) and Path(str(data.get("out_dir"))).resolve() == checkpoint.parent.resolve():
                hint = f": run `mixerzoo {data.get('stage', 'sft')} {other}` first (it writes that file)"
                break
        raise FileNotFoundError(2, f"{role}.checkpoint does not exist{hint or ' (train or save that model first)'}",
                                str(checkpoint))
