"""Hugging Face import (Qwen2.5-VL, and the InfiniteVL release layout) and conversion of a
VLM to another decoder layout (e.g. Qwen2.5-VL -> InfiniteVL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from mixerzoo.blocks import Decoder, LayoutSpec
from mixerzoo.mixers import Attention, GatedDeltaNet
from mixerzoo.registry import recipe as recipe_spec
from mixerzoo.blocks.hub import read_checkpoint
from mixerzoo.vlm.checkpoint import decoder_spec, rename
from mixerzoo.vlm.model import VLM, VLMSpec
from mixerzoo.vlm.processor import ProcessorConfig
from mixerzoo.vlm.vision import VisionConfig


def vlm_spec_from_config(config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> VLMSpec:
    """The VLMSpec of a Qwen2.5-VL (or InfiniteVL-release) config.json."""
    vision = config["vision_config"]
    vision_fields = {k: v for k, v in vision.items() if k in VisionConfig.model_fields and k != "backend"}
    processor = ProcessorConfig(
        image_pad_id=config["image_token_id"], video_pad_id=config["video_token_id"],
        vision_start_id=config["vision_start_token_id"], vision_end_id=config["vision_end_token_id"],
        tokens_per_second=vision.get("tokens_per_second", ProcessorConfig().tokens_per_second),
    )
    return VLMSpec(decoder=decoder_spec(config, tensors), vision=VisionConfig(**vision_fields), processor=processor)


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.float32) -> VLM:
    """A VLM from a Qwen2.5-VL checkpoint directory (config.json + safetensors, sharded or not),
    or from one in the InfiniteVL release layout (`layer_types` with linear_attention layers
    holding fla GatedDeltaNet parameters). Every tensor must map; every parameter must be set."""
    config, tensors = read_checkpoint(path)
    spec = vlm_spec_from_config(config, tensors)
    with torch.device("meta"):
        model = VLM(spec)
    weights = rename(tensors)
    if spec.decoder.tie_embeddings:
        weights.pop("decoder.lm_head.weight", None)
    model.load_state_dict({k: t.to(dtype) for k, t in weights.items()}, strict=True, assign=True)
    return model.eval()


load_qwen2_5_vl = load_pretrained


def _letter(mixer) -> str:
    if mixer.type == "attention":
        return "F" if mixer.window is None else "S"
    return {"gated_deltanet": "G", "mamba2": "M"}[mixer.type]


def target_spec(
    source: LayoutSpec, recipe: str, *, window: int | None = None, gdn: dict[str, Any] | None = None
) -> LayoutSpec:
    """`source`'s decoder with each layer's mixer chosen by `recipe`'s layer pattern (tiled over
    source's depth): F keeps full attention, S keeps the attention with `window`, G becomes a
    Gated DeltaNet of the attention's heads and head dim (`gdn` overrides its fields)."""
    pattern = [_letter(layer.mixer) for layer in recipe_spec(recipe, "paper").layers]
    layers = []
    for i, layer in enumerate(source.layers):
        if layer.mixer.type != "attention":
            raise ValueError(f"conversion: source layer {i} is {layer.mixer.type!r}; only attention layers convert")
        letter, attention = pattern[i % len(pattern)], layer.mixer
        if letter == "F":
            mixer = attention.model_copy(update={"window": None})
        elif letter == "S":
            if window is None:
                raise ValueError(f"conversion to {recipe!r} needs a window for its sliding-window layers")
            mixer = attention.model_copy(update={"window": window})
        elif letter == "G":
            mixer = {"type": "gated_deltanet", "d_model": source.d_model, "n_heads": attention.n_heads,
                     "head_dim": attention.dim, "expand_v": 2, "conv_size": 4, **(gdn or {})}
        else:
            raise ValueError(f"conversion: recipe {recipe!r} asks for {letter!r} layers, which have no conversion")
        layers.append({"mixer": mixer if isinstance(mixer, dict) else mixer.model_dump(), "mlp": layer.mlp.model_dump()})
    return LayoutSpec.model_validate({**source.model_dump(exclude={"layers"}), "layers": layers})


@torch.no_grad()
def convert(
    model: VLM | Decoder,
    recipe: str = "infinitevl",
    *,
    window: int | None = None,
    gdn_init: Literal["mimic", "attention"] = "mimic",
    gdn: dict[str, Any] | None = None,
) -> VLM | Decoder:
    """A model of `model`'s kind (VLM or text Decoder) with `recipe`'s layer pattern built from it
    (see `target_spec`): vision, merger, embeddings, norms, MLPs and kept attention layers are
    copied; new Gated DeltaNet layers get the release's mimic init, or (gdn_init="attention")
    additionally inherit q/k/v/o from the attention they replace (which needs expand_v = 1: set by
    default)."""
    if not isinstance(model, (VLM, Decoder)):
        raise TypeError(f"convert takes a VLM or a Decoder, got {type(model).__name__}")
    if gdn_init == "attention":
        gdn = {"expand_v": 1, **(gdn or {})}
    source = model.decoder if isinstance(model, VLM) else model
    decoder = target_spec(source.spec, recipe, window=window, gdn=gdn)
    weight = next(model.parameters())
    with torch.device(weight.device):
        if isinstance(model, VLM):
            student = VLM(VLMSpec(decoder=decoder, vision=model.spec.vision, processor=model.spec.processor))
        else:
            student = Decoder(decoder)
        student = student.to(weight.dtype)
    target = student.decoder if isinstance(student, VLM) else student
    prefix = "decoder.layers." if isinstance(student, VLM) else "layers."
    copied = {k: v for k, v in model.state_dict().items() if k in student.state_dict() and
              student.state_dict()[k].shape == v.shape and not _is_new_mixer(k, prefix, target)}
    student.load_state_dict(copied, strict=False)
    for block, teacher in zip(target.layers, source.layers):
        if isinstance(block.mixer, GatedDeltaNet):
            block.mixer.mimic_init()
            if gdn_init == "attention" and isinstance(teacher.mixer, Attention):
                block.mixer.init_from_attention(teacher.mixer)
    return student.eval()


def _is_new_mixer(name: str, prefix: str, decoder: Decoder) -> bool:
    """Whether parameter `name` (decoder blocks under `prefix`) belongs to a mixer whose type the conversion changed."""
    if not name.startswith(prefix):
        return False
    index, part = name[len(prefix):].split(".")[:2]
    return part == "mixer" and not isinstance(decoder.layers[int(index)].mixer, Attention)