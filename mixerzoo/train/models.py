"""The models a stage trains: built from a ModelSource, saved and loaded in one safetensors file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mixerzoo.blocks import Decoder, LayoutSpec
from mixerzoo.errors import open_safetensors
from mixerzoo.mixers.base import atomic_save_safetensors
from mixerzoo.registry import recipe
from mixerzoo.train.config import ModelSource
from mixerzoo.vlm import VLM, load_vlm, save_vlm
from mixerzoo.vlm.hf import convert
from mixerzoo.vlm.recipes import vlm_recipe

_DECODER_FORMAT = "mixerzoo.decoder/1"


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """A Decoder or VLM with its spec in one safetensors file, written atomically."""
    if isinstance(model, VLM):
        save_vlm(model, path)
        return
    if not isinstance(model, Decoder):
        raise TypeError(f"save_model takes a Decoder or a VLM, got {type(model).__name__}")
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    atomic_save_safetensors(tensors, Path(path), {"format": _DECODER_FORMAT, "spec": model.spec.to_json()})


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> nn.Module:
    """The Decoder or VLM written by `save_model` (or `save_vlm`)."""
    with open_safetensors(path, device="cpu") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") == "mixerzoo.vlm/1":
        return load_vlm(path, device=device)
    if metadata.get("format") != _DECODER_FORMAT:
        raise ValueError(f"{path}: not a mixerzoo model file (format {metadata.get('format')!r})")
    with open_safetensors(path, device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        model = Decoder(LayoutSpec.from_json(metadata["spec"]))
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def build_model(source: ModelSource, teacher: nn.Module | None = None) -> nn.Module:
    """The model `source` describes, in float32 on the CPU, in train mode."""
    if source.checkpoint is not None:
        return load_model(source.checkpoint).train()
    if source.convert_from_teacher:
        if not isinstance(teacher, (VLM, Decoder)):
            raise ValueError("convert_from_teacher converts a VLM or Decoder teacher; the teacher is "
                             f"{type(teacher).__name__}")
        torch.manual_seed(source.seed)
        windows = [layer.mixer.window for layer in recipe(source.recipe, source.size).layers
                   if getattr(layer.mixer, "window", None)]
        window = source.window or max(windows, default=None)  # default: the recipe's window at `size`
        return convert(teacher, source.recipe, window=window).train()
    torch.manual_seed(source.seed)
    model = VLM(vlm_recipe(source.recipe, source.size)) if source.vlm else Decoder(recipe(source.recipe, source.size))
    return model.train()


def decoder_of(model: nn.Module) -> Decoder:
    """The Decoder of a VLM, or the model itself."""
    return model.decoder if isinstance(model, VLM) else model
