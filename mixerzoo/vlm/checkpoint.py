"""Mapping Qwen2.5-VL / InfiniteVL-release checkpoint names and configs onto mixerzoo's (folders are read by
blocks.hub.read_checkpoint)."""

from __future__ import annotations

import re
from typing import Any

import torch

from mixerzoo.blocks import LayoutSpec

# HF names (transformers 4.x on-disk and 5.x in-memory layouts) -> ours, first match wins.
_RENAMES = [
    (r"^(?:model\.)?visual\.(.+)$", r"visual.\1"),
    (r"^model\.visual\.(.+)$", r"visual.\1"),
    (r"^(?:model\.language_model\.|model\.)embed_tokens\.weight$", r"decoder.embed.weight"),
    (r"^(?:model\.language_model\.|model\.)norm\.weight$", r"decoder.norm.weight"),
    (r"^(?:model\.language_model\.|model\.)layers\.(\d+)\.input_layernorm\.(.+)$", r"decoder.layers.\1.mixer_norm.\2"),
    (r"^(?:model\.language_model\.|model\.)layers\.(\d+)\.post_attention_layernorm\.(.+)$", r"decoder.layers.\1.mlp_norm.\2"),
    (r"^(?:model\.language_model\.|model\.)layers\.(\d+)\.self_attn\.(.+)$", r"decoder.layers.\1.mixer.\2"),
    (r"^(?:model\.language_model\.|model\.)layers\.(\d+)\.mlp\.(.+)$", r"decoder.layers.\1.mlp.\2"),
    (r"^lm_head\.weight$", r"decoder.lm_head.weight"),
]


def rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensor names -> mixerzoo VLM names (visual.*, decoder.*); an unknown name is an error."""
    renamed = {}
    for name, tensor in tensors.items():
        for pattern, target in _RENAMES:
            if re.match(pattern, name):
                renamed[re.sub(pattern, target, name)] = tensor
                break
        else:
            raise KeyError(f"checkpoint tensor {name!r} has no mixerzoo counterpart")
    return renamed


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The LLM part of a Qwen2.5-VL config: `text_config` (transformers 5) or the top level (4.x)."""
    return {**config, **config.get("text_config", {})}


def _rope(text: dict[str, Any]) -> dict[str, Any]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
    return {"kind": "mrope", "sections": list(rope["mrope_section"]), "theta": float(theta)}


def decoder_spec(config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> LayoutSpec:
    """The LayoutSpec of a Qwen2.5-VL LLM, or of an InfiniteVL-release LLM whose `layer_types`
    name linear_attention (fla GatedDeltaNet, shapes read from `tensors`), sliding_attention
    and full_attention layers."""
    text = text_config(config)
    n_layers, d_model = text["num_hidden_layers"], text["hidden_size"]
    heads = text["num_attention_heads"]
    attention = dict(
        type="attention", n_heads=heads, n_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim", d_model // heads), qkv_bias=True, rope=_rope(text),
    )
    window = text.get("sliding_window") if text.get("use_sliding_window") else None
    layer_types = text.get("layer_types") or ["full_attention"] * n_layers
    if len(layer_types) != n_layers:
        raise ValueError(f"config: {len(layer_types)} layer_types for {n_layers} layers")
    layers = []
    for i, kind in enumerate(layer_types):
        if kind == "full_attention":
            mixer = attention
        elif kind == "sliding_attention":
            if not text.get("sliding_window"):
                raise ValueError(f"config: layer {i} is sliding_attention but sliding_window is not set")
            mixer = {**attention, "window": text["sliding_window"]}
        elif kind == "linear_attention":
            mixer = _gdn_from_tensors(i, tensors or {}, key_heads=text.get("linear_num_key_heads", heads))
        else:
            raise ValueError(f"config: layer {i} has unknown layer type {kind!r}")
        layers.append({"mixer": mixer, "mlp": {"type": "swiglu", "hidden": text["intermediate_size"]}})
    if window is not None and "sliding_attention" not in layer_types:
        raise ValueError("config: use_sliding_window without per-layer layer_types is not supported")
    return LayoutSpec.model_validate(dict(
        d_model=d_model, vocab_size=text["vocab_size"], layers=layers, norm_eps=text.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
    ))


def _gdn_from_tensors(layer: int, tensors: dict[str, torch.Tensor], *, key_heads: int) -> dict[str, Any]:
    """A GatedDeltaNet spec read off the fla-named tensors of one layer (`key_heads` q/k heads)."""
    prefixes = (f"model.language_model.layers.{layer}.self_attn.", f"model.layers.{layer}.self_attn.")
    found = {name[len(p):]: t for name, t in tensors.items() for p in prefixes if name.startswith(p)}
    if "A_log" not in found:
        raise ValueError(f"config: layer {layer} is linear_attention but the checkpoint has no self_attn.A_log for it")
    v_heads = found["A_log"].shape[0]
    head_dim = found["q_proj.weight"].shape[0] // key_heads
    value_dim = found["v_proj.weight"].shape[0] // v_heads
    return dict(
        type="gated_deltanet", n_heads=key_heads, n_v_heads=v_heads, head_dim=head_dim, expand_v=value_dim / head_dim,
        conv_size=found["q_conv1d.weight"].shape[-1], conv_bias="q_conv1d.bias" in found,
    )
