"""Checkpoints in and out of transformers: `from_pretrained(dir)` builds the Decoder whose layout reproduces a
transformers causal-LM folder (config.json + safetensors, sharded or not), `save_pretrained(model, dir)`
writes the folder transformers loads back with equal logits.

Families: llama, qwen2, qwen3 (dense attention), qwen3_next (Gated DeltaNet and gated attention, dense
MLPs and experts), lfm2, bamba (Mamba2 and attention), jamba (Mamba
with its inner norms, NoPE attention, experts), minimax (lightning and softmax attention, experts), mamba and mamba2. A layout no family holds is saved in mixerzoo's own folder format (config.json naming
model_type "mixerzoo" with the spec, and model.safetensors), which `from_pretrained` reads too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from mixerzoo.blocks.decoder import Decoder
from mixerzoo.blocks.spec import LayoutSpec
from mixerzoo.errors import open_safetensors
from mixerzoo.mixers.linear_family import Lightning
from mixerzoo.mixers.base import atomic_save_safetensors, atomic_write_bytes

NATIVE = "mixerzoo"  # model_type of mixerzoo's own folder format
Tensors = dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and every tensor of a checkpoint directory (one file or an index of shards)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    config = json.loads(config_file.read_text())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        with open_safetensors(path / shard) as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return config, tensors


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformers model family: its config -> our spec, its weights <-> ours, our spec -> its config."""

    spec: Callable[[dict[str, Any]], LayoutSpec]
    to_ours: Callable[[Tensors, LayoutSpec], Tensors]
    to_theirs: Callable[[Tensors, LayoutSpec], Tensors]
    config: Callable[[LayoutSpec], dict[str, Any]]
    architecture: str
    fold: Callable[[Tensors, dict[str, Any]], Tensors] | None = None  # the config's multipliers into its weights


def _require(config: dict[str, Any], key: str, model_type: str) -> Any:
    if key not in config:
        raise KeyError(f"{model_type} config.json has no {key!r}")
    return config[key]


def _rope_theta(config: dict[str, Any]) -> float:
    """The rotary base of a config (transformers 5's rope_parameters or 4.x's rope_theta); other rope types refused."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config.json rope type {kind!r}: only the default rotary embedding maps to mixerzoo")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _model(config: dict[str, Any], layers: list[dict]) -> LayoutSpec:
    return LayoutSpec.model_validate({
        "d_model": config["hidden_size"], "vocab_size": config["vocab_size"], "layers": layers,
        "norm_eps": config.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(config.get("tie_word_embeddings", False))})


# Names shared by every family: embeddings, norms, MLPs and the head; the token mixer's prefix differs.
_SHARED = [(r"model\.embed_tokens\.", "embed."), (r"model\.norm\.", "norm."), (r"lm_head\.", "lm_head."),
           (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.mixer_norm."),
           (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm."),
           (r"model\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
           (r"model\.layers\.(\d+)\.self_attn\.", r"layers.\1.mixer.")]


def _inverse(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Prefix rename rules (at most one layer index each) turned around: ours -> theirs, in the same order."""
    def pattern(target: str) -> str:
        return re.escape(target).replace(re.escape("\\1"), r"(\d+)")

    def target(pattern: str) -> str:
        return pattern.replace(r"(\d+)", "\\1").replace("\\.", ".")

    return [(pattern(theirs), target(ours)) for ours, theirs in rules]


# The same names, ours -> theirs.
_SHARED_BACK = _inverse(_SHARED)


def _renamed(tensors: Tensors, rules: list[tuple[str, str]], what: str) -> Tensors:
    """Every tensor renamed by the first rule whose pattern starts its name; a name no rule takes is an error."""
    out = {}
    for name, tensor in tensors.items():
        for pattern, target in rules:
            if re.match(pattern, name):
                out[re.sub(pattern, target, name, count=1)] = tensor
                break
        else:
            raise KeyError(f"{what} tensor {name!r} maps to no mixerzoo weight")
    return out


# ------------------------------------------------------------------------------------------- dense families

def _dense_family(model_type: str, *, qkv_bias: bool, qk_norm: bool, architecture: str) -> Family:
    def spec(config: dict[str, Any]) -> LayoutSpec:
        if config.get("attention_bias", qkv_bias) != qkv_bias and model_type == "llama":
            raise ValueError("llama config.json attention_bias true: its o_proj bias has no mixerzoo counterpart")
        if config.get("mlp_bias"):
            raise ValueError(f"{model_type} config.json mlp_bias true: mixerzoo's SwiGLU maps only bias-free MLPs")
        heads = _require(config, "num_attention_heads", model_type)
        mixer = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads", heads),
                 "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "qkv_bias": qkv_bias,
                 "qk_norm": qk_norm, "norm_eps": config.get("rms_norm_eps", 1e-6), "rope": {"theta": _rope_theta(config)}}
        if config.get("sliding_window") and config.get("use_sliding_window"):
            raise ValueError(f"{model_type} config.json use_sliding_window: per-layer windows are not mapped yet")
        layer = {"mixer": mixer, "mlp": {"type": "swiglu", "hidden": _require(config, "intermediate_size", model_type)}}
        return _model(config, [layer] * _require(config, "num_hidden_layers", model_type))

    def config(spec: LayoutSpec) -> dict[str, Any]:
        attn, mlp = spec.layers[0].mixer, spec.layers[0].mlp
        return {"model_type": model_type, "architectures": [architecture], "vocab_size": spec.vocab_size,
                "hidden_size": spec.d_model, "intermediate_size": mlp.hidden, "num_hidden_layers": spec.n_layers,
                "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads, "head_dim": attn.dim,
                "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings, "hidden_act": "silu",
                "attention_bias": qkv_bias if model_type == "llama" else False, "max_position_embeddings": 32768,
                "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope.theta}}

    return Family(spec, lambda t, s: _renamed(t, _SHARED, model_type), lambda t, s: _renamed(t, _SHARED_BACK, "mixerzoo"),
                  config, architecture)


def _dense_holds(spec: LayoutSpec, *, qkv_bias: bool, qk_norm: bool) -> bool:
    """Whether every layer is the same plain full attention + SwiGLU a dense family writes. M-RoPE counts as
    RoPE: text positions are equal in its three sections, where it is 1-D RoPE (the folder is a text model)."""
    first = spec.layers[0]
    return all(layer.model_dump() == first.model_dump() for layer in spec.layers) and first.mlp.type == "swiglu" and not first.mlp.bias and (
        first.mixer.type == "attention" and first.mixer.window is None and not first.mixer.output_gate
        and first.mixer.qkv_bias == qkv_bias and first.mixer.qk_norm == qk_norm
        and first.mixer.rope.kind in ("rope", "mrope") and first.mixer.rope.fraction == 1)


# ------------------------------------------------------------------------------------------------ qwen3_next

def _qwen3_next_mlp(config: dict[str, Any], index: int) -> dict[str, Any]:
    """Layer `index`'s MLP: experts with a gated shared expert where Qwen3-Next puts them, else dense."""
    sparse = config.get("num_experts", 0) and index not in config.get("mlp_only_layers", []) and (
        (index + 1) % config.get("decoder_sparse_step", 1) == 0)
    if not sparse:
        return {"type": "swiglu", "hidden": config["intermediate_size"]}
    return {"type": "experts", "hidden": config["moe_intermediate_size"], "n_experts": config["num_experts"],
            "top_k": config["num_experts_per_tok"], "normalize_top_k": bool(config.get("norm_topk_prob", True)),
            "shared_hidden": config["shared_expert_intermediate_size"], "shared_gate": True}


def _qwen3_next_spec(config: dict[str, Any]) -> LayoutSpec:
    eps = config.get("rms_norm_eps", 1e-6)
    key_dim, value_dim = config["linear_key_head_dim"], config["linear_value_head_dim"]
    gdn = {"type": "gated_deltanet", "n_heads": config["linear_num_key_heads"], "head_dim": key_dim,
           "n_v_heads": None if config["linear_num_value_heads"] == config["linear_num_key_heads"]
           else config["linear_num_value_heads"], "expand_v": value_dim / key_dim,
           "conv_size": config["linear_conv_kernel_dim"], "norm_eps": eps}
    heads = config["num_attention_heads"]
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config["num_key_value_heads"],
                 "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "output_gate": True,
                 "qk_norm": True, "norm_eps": eps,
                 "rope": {"theta": _rope_theta(config), "fraction": config.get("partial_rotary_factor", 0.25)}}
    kinds = {"linear_attention": gdn, "full_attention": attention}
    layers = []
    for i, kind in enumerate(_require(config, "layer_types", "qwen3_next")):
        if kind not in kinds:
            raise ValueError(f"qwen3_next config.json layer_types[{i}] = {kind!r}: not linear_attention or full_attention")
        layers.append({"mixer": kinds[kind], "mlp": _qwen3_next_mlp(config, i)})
    return _model(config, layers)


def _centred(name: str) -> bool:
    """Qwen3-Next's RMSNorms that scale by 1 + w (all but the Gated DeltaNet's output norm)."""
    return bool(re.search(r"(input_layernorm|post_attention_layernorm|q_norm|k_norm)\.weight$|^model\.norm\.weight$", name))


# Per-expert SwiGLU names in checkpoints (Qwen's and Jamba's; Mixtral and MiniMax call them w1, w3, w2).
_EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def _experts_to_ours(theirs: Tensors, spec: LayoutSpec, prefix: Callable[[int], str], router: str = "gate",
                     names: dict[str, str] = _EXPERT_NAMES) -> Tensors:
    """Every experts layer's router and per-expert matrices, popped from `theirs` ("{prefix(i)}{router}.weight",
    "{prefix(i)}experts.{e}.{name}.weight"; or transformers' in-memory stacks "experts.gate_up_proj" /
    "experts.down_proj"), stacked as our Experts' [E, ...] parameters."""
    ours = {}
    for i, layer in enumerate(spec.layers):
        if layer.mlp.type != "experts":
            continue
        source, mine = prefix(i), f"layers.{i}.mlp."
        ours[mine + "router.weight"] = theirs.pop(f"{source}{router}.weight")
        if f"{source}experts.gate_up_proj" in theirs:
            ours[mine + "gate_proj"], ours[mine + "up_proj"] = theirs.pop(f"{source}experts.gate_up_proj").chunk(2, 1)
            ours[mine + "down_proj"] = theirs.pop(f"{source}experts.down_proj")
            continue
        for our_name, their_name in names.items():
            keys = [f"{source}experts.{e}.{their_name}.weight" for e in range(layer.mlp.n_experts)]
            missing = [key for key in keys if key not in theirs]
            if missing:
                raise KeyError(f"the checkpoint gives no {missing[0]!r} (layer {i} has {layer.mlp.n_experts} experts)")
            ours[mine + our_name] = torch.stack([theirs.pop(key) for key in keys])
    return ours


def _experts_to_theirs(ours: Tensors, spec: LayoutSpec, prefix: Callable[[int], str], router: str = "gate",
                       names: dict[str, str] = _EXPERT_NAMES) -> Tensors:
    """The inverse of `_experts_to_ours` (per-expert names, as transformers saves them)."""
    theirs = {}
    for i, layer in enumerate(spec.layers):
        if layer.mlp.type != "experts":
            continue
        target, mine = prefix(i), f"layers.{i}.mlp."
        theirs[f"{target}{router}.weight"] = ours.pop(mine + "router.weight")
        for our_name, their_name in names.items():
            for e, matrix in enumerate(ours.pop(mine + our_name).unbind(0)):
                theirs[f"{target}experts.{e}.{their_name}.weight"] = matrix
    return theirs


def _qwen3_next_to_ours(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    theirs = {name: (1 + t if _centred(name) else t) for name, t in tensors.items()}
    ours = _experts_to_ours(theirs, spec, lambda i: f"model.layers.{i}.mlp.")
    for i, layer in enumerate(spec.layers):
        prefix, mine = f"model.layers.{i}.", f"layers.{i}.mixer."
        c = layer.mixer
        if c.type == "attention":
            query, gate = theirs.pop(prefix + "self_attn.q_proj.weight").unflatten(0, (c.n_heads, 2 * c.dim)).chunk(2, 1)
            ours |= {mine + "q_proj.weight": query.flatten(0, 1), mine + "gate_proj.weight": gate.flatten(0, 1)}
            continue
        take = {name[len(prefix + "linear_attn."):]: theirs.pop(name) for name in list(theirs)
                if name.startswith(prefix + "linear_attn.")}
        ours |= {mine + name: t for name, t in _gdn_to_ours(take, c).items()}
    return ours | _renamed(theirs, _SHARED, "qwen3_next")


def _gdn_to_ours(theirs: Tensors, c) -> Tensors:
    """A Qwen3-Next Gated DeltaNet's tensors (per key head: q, k, v, z in in_proj_qkvz; b, a in in_proj_ba;
    one conv over q, k, v channels) -> our GatedDeltaNet's."""
    group, k, v = c.value_heads // c.n_heads, c.key_dim, c.value_dim
    q, kk, vv, z = theirs["in_proj_qkvz.weight"].unflatten(0, (c.n_heads, -1)).split([k, k, group * v, group * v], 1)
    b, a = theirs["in_proj_ba.weight"].unflatten(0, (c.n_heads, -1)).split([group, group], 1)
    conv_q, conv_k, conv_v = theirs["conv1d.weight"].split([c.n_heads * k, c.n_heads * k, c.value_heads * v])
    flat = {"q_proj": q, "k_proj": kk, "v_proj": vv, "g_proj": z, "b_proj": b, "a_proj": a}
    return {f"{name}.weight": t.flatten(0, 1) for name, t in flat.items()} | {
        "q_conv1d.weight": conv_q, "k_conv1d.weight": conv_k, "v_conv1d.weight": conv_v, "A_log": theirs["A_log"],
        "dt_bias": theirs["dt_bias"], "o_norm.weight": theirs["norm.weight"], "o_proj.weight": theirs["out_proj.weight"]}


def _gdn_to_theirs(ours: Tensors, c) -> Tensors:
    """The inverse of `_gdn_to_ours`."""
    per_head = [ours[f"{name}.weight"].unflatten(0, (c.n_heads, -1)) for name in ("q_proj", "k_proj", "v_proj", "g_proj")]
    ba = [ours[f"{name}.weight"].unflatten(0, (c.n_heads, -1)) for name in ("b_proj", "a_proj")]
    return {"in_proj_qkvz.weight": torch.cat(per_head, 1).flatten(0, 1), "in_proj_ba.weight": torch.cat(ba, 1).flatten(0, 1),
            "conv1d.weight": torch.cat([ours[f"{n}_conv1d.weight"] for n in "qkv"]), "A_log": ours["A_log"],
            "dt_bias": ours["dt_bias"], "norm.weight": ours["o_norm.weight"], "out_proj.weight": ours["o_proj.weight"]}


def _qwen3_next_to_theirs(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    ours = dict(tensors)
    theirs = _experts_to_theirs(ours, spec, lambda i: f"model.layers.{i}.mlp.")
    for i, layer in enumerate(spec.layers):
        mine, prefix = f"layers.{i}.mixer.", f"model.layers.{i}."
        c = layer.mixer
        if c.type == "attention":
            query = ours.pop(mine + "q_proj.weight").unflatten(0, (c.n_heads, c.dim))
            gate = ours.pop(mine + "gate_proj.weight").unflatten(0, (c.n_heads, c.dim))
            theirs[prefix + "self_attn.q_proj.weight"] = torch.cat([query, gate], 1).flatten(0, 1)
            continue
        take = {name[len(mine):]: ours.pop(name) for name in list(ours) if name.startswith(mine)}
        theirs |= {prefix + "linear_attn." + name: t for name, t in _gdn_to_theirs(take, c).items()}
    theirs |= _renamed(ours, _SHARED_BACK, "mixerzoo")
    return {name: (t - 1 if _centred(name) else t) for name, t in theirs.items()}


def _qwen3_next_experts(spec: LayoutSpec) -> dict[str, Any]:
    """The MoE fields of a Qwen3-Next config: the first experts layer's shape, the dense layers listed."""
    experts = next((layer.mlp for layer in spec.layers if layer.mlp.type == "experts"), None)
    dense = next((layer.mlp for layer in spec.layers if layer.mlp.type != "experts"), None)
    fields = {"intermediate_size": (dense or experts).hidden, "num_experts": 0}
    if experts is None:
        return fields
    return fields | {"num_experts": experts.n_experts, "num_experts_per_tok": experts.top_k,
                     "moe_intermediate_size": experts.hidden, "shared_expert_intermediate_size": experts.shared_hidden,
                     "norm_topk_prob": experts.normalize_top_k, "decoder_sparse_step": 1,
                     "mlp_only_layers": [i for i, layer in enumerate(spec.layers) if layer.mlp.type != "experts"]}


def _qwen3_next_config(spec: LayoutSpec) -> dict[str, Any]:
    gdn = next(layer.mixer for layer in spec.layers if layer.mixer.type == "gated_deltanet")
    attn = next(layer.mixer for layer in spec.layers if layer.mixer.type == "attention")
    return {"model_type": "qwen3_next", "architectures": ["Qwen3NextForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads, "head_dim": attn.dim,
            "partial_rotary_factor": attn.rope.fraction, "rms_norm_eps": spec.norm_eps, "hidden_act": "silu",
            "tie_word_embeddings": spec.tie_embeddings, "linear_conv_kernel_dim": gdn.conv_size,
            "linear_key_head_dim": gdn.key_dim, "linear_value_head_dim": gdn.value_dim,
            "linear_num_key_heads": gdn.n_heads, "linear_num_value_heads": gdn.value_heads, **_qwen3_next_experts(spec),
            "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope.theta},
            "layer_types": ["linear_attention" if layer.mixer.type == "gated_deltanet" else "full_attention"
                            for layer in spec.layers]}


def _arithmetic(spec: LayoutSpec) -> dict[str, Any]:
    """The spec without what a transformers config cannot hold and that changes no weight or output beyond
    rounding (each mixer's backend and chunk length), its implicit sizes resolved (None for a default that
    the config writes out: an attention's n_kv_heads and head_dim, a Mamba's dt_rank, a lightning attention's
    head_dim)."""
    resolved = {"attention": {"n_kv_heads": "kv_heads", "head_dim": "dim"}, "mamba": {"dt_rank": "rank"},
                "lightning": {"head_dim": "key_dim"}, "rglru": {"lru_width": "width"}, "mamba2": {"d_ssm": "d_inner"}}

    def arithmetic(mixer: dict[str, Any], source) -> dict[str, Any]:
        mixer = {k: v for k, v in mixer.items() if k not in ("backend", "chunk_size")}
        for field, value in resolved.get(mixer["type"], {}).items():
            mixer[field] = getattr(source, value)
        if mixer["type"] == "parallel":
            mixer["mixers"] = [arithmetic(m, s) for m, s in zip(mixer["mixers"], source.mixers)]
            mixer["output_scales"] = source.scales
        return mixer

    data = spec.model_dump(mode="json")
    for layer, source in zip(data["layers"], spec.layers):
        layer["mixer"] = arithmetic(layer["mixer"], source.mixer)
    return data


def _round_trips(spec: LayoutSpec, to_spec: Callable[[dict[str, Any]], LayoutSpec],
                 to_config: Callable[[LayoutSpec], dict[str, Any]]) -> bool:
    """Whether a family's config of `spec` describes `spec` again (up to backend and chunk length)."""
    try:
        return _arithmetic(to_spec(to_config(spec))) == _arithmetic(spec)
    except (StopIteration, ValueError, KeyError, AttributeError, ZeroDivisionError):
        return False


# ------------------------------------------------------------------------------------------- mamba, mamba2

# State-space LMs: embeddings, one pre-norm per layer, the mixer (parameter names as ours), no MLP.
_BACKBONE = [(r"backbone\.embeddings\.", "embed."), (r"backbone\.norm_f\.", "norm."), (r"lm_head\.", "lm_head."),
             (r"backbone\.layers\.(\d+)\.norm\.", r"layers.\1.mixer_norm."),
             (r"backbone\.layers\.(\d+)\.mixer\.", r"layers.\1.mixer.")]
_BACKBONE_BACK = _inverse(_BACKBONE)


def _number(value: Any) -> float:
    """A config number; transformers writes infinities as {"__float__": "Infinity"}."""
    return float(value["__float__"]) if isinstance(value, dict) and "__float__" in value else float(value)


def _ssm_model(config: dict[str, Any], mixer: dict[str, Any]) -> LayoutSpec:
    layers = [{"mixer": mixer, "mlp": {"type": "none"}}] * _require(config, "num_hidden_layers", mixer["type"])
    return LayoutSpec.model_validate({
        "d_model": config["hidden_size"], "vocab_size": config["vocab_size"], "layers": layers,
        "norm_eps": config.get("layer_norm_epsilon", 1e-5), "tie_embeddings": bool(config.get("tie_word_embeddings", True))})


def _mamba_spec(config: dict[str, Any]) -> LayoutSpec:
    rank = config.get("time_step_rank", "auto")
    rank = math.ceil(config["hidden_size"] / 16) if rank == "auto" else rank
    return _ssm_model(config, {"type": "mamba", "d_state": config.get("state_size", 16), "d_conv": config.get("conv_kernel", 4),
                               "expand": config.get("expand", 2), "dt_rank": rank, "bias": bool(config.get("use_bias", False)),
                               "conv_bias": bool(config.get("use_conv_bias", True))})


def _mamba_config(spec: LayoutSpec) -> dict[str, Any]:
    m = spec.layers[0].mixer
    return {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers, "state_size": m.d_state,
            "conv_kernel": m.d_conv, "expand": m.expand, "time_step_rank": m.dt_rank, "use_bias": m.bias,
            "use_conv_bias": m.conv_bias, "layer_norm_epsilon": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings}


def _mamba2_spec(config: dict[str, Any]) -> LayoutSpec:
    d_inner = config.get("expand", 2) * config["hidden_size"]
    head_dim = config.get("head_dim", 64)
    if config.get("num_heads", d_inner // head_dim) * head_dim != d_inner:
        raise ValueError(f"mamba2 config.json num_heads x head_dim = {config.get('num_heads')} x {head_dim} is not "
                         f"expand x hidden_size = {d_inner}")
    if config.get("use_bias") or not config.get("rms_norm", True):
        raise ValueError("mamba2 config.json use_bias true or rms_norm false: not mixerzoo's Mamba2 block")
    limit = [_number(x) for x in config.get("time_step_limit", (0.0, float("inf")))]
    return _ssm_model(config, {"type": "mamba2", "d_state": config.get("state_size", 128), "d_conv": config.get("conv_kernel", 4),
                               "expand": config.get("expand", 2), "head_dim": head_dim, "n_groups": config.get("n_groups", 1),
                               "conv_bias": bool(config.get("use_conv_bias", True)), "dt_limit": list(limit),
                               "norm_eps": config.get("layer_norm_epsilon", 1e-5)})


def _mamba2_config(spec: LayoutSpec) -> dict[str, Any]:
    m = spec.layers[0].mixer
    return {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers, "state_size": m.d_state,
            "conv_kernel": m.d_conv, "expand": m.expand, "head_dim": m.head_dim, "num_heads": m.expand * spec.d_model // m.head_dim,
            "n_groups": m.n_groups, "use_bias": False, "use_conv_bias": m.conv_bias, "rms_norm": True,
            "time_step_limit": list(m.dt_limit), "layer_norm_epsilon": spec.norm_eps,
            "tie_word_embeddings": spec.tie_embeddings}


def _backbone_family(spec, config, architecture) -> Family:
    return Family(spec, lambda t, s: _renamed(t, _BACKBONE, architecture), lambda t, s: _renamed(t, _BACKBONE_BACK, "mixerzoo"),
                  config, architecture)


def _ssm_holds(spec: LayoutSpec, model_type: str) -> bool:
    """Whether every layer is one `model_type` mixer with no MLP, whose every field its config holds."""
    first = spec.layers[0]
    if first.mixer.type != model_type or first.mlp.type != "none":
        return False
    if any(layer.model_dump() != first.model_dump() for layer in spec.layers):
        return False
    build = {"mamba": (_mamba_spec, _mamba_config), "mamba2": (_mamba2_spec, _mamba2_config)}[model_type]
    return _arithmetic(build[0](build[1](spec))) == _arithmetic(spec)


# ----------------------------------------------------------------------------------------------------- lfm2

# LFM2's names: operator_norm / ffn_norm around each layer, self_attn (out_proj, q_layernorm, k_layernorm) or
# conv (as our short_conv), feed_forward (w1 gate, w3 up, w2 down), embedding_norm the final norm.
_LFM2 = [(r"model\.embed_tokens\.", "embed."), (r"model\.embedding_norm\.", "norm."), (r"lm_head\.", "lm_head."),
         (r"model\.layers\.(\d+)\.operator_norm\.", r"layers.\1.mixer_norm."),
         (r"model\.layers\.(\d+)\.ffn_norm\.", r"layers.\1.mlp_norm."),
         (r"model\.layers\.(\d+)\.feed_forward\.w1\.", r"layers.\1.mlp.gate_proj."),
         (r"model\.layers\.(\d+)\.feed_forward\.w3\.", r"layers.\1.mlp.up_proj."),
         (r"model\.layers\.(\d+)\.feed_forward\.w2\.", r"layers.\1.mlp.down_proj."),
         (r"model\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.mixer.o_proj."),
         (r"model\.layers\.(\d+)\.self_attn\.q_layernorm\.", r"layers.\1.mixer.q_norm."),
         (r"model\.layers\.(\d+)\.self_attn\.k_layernorm\.", r"layers.\1.mixer.k_norm."),
         (r"model\.layers\.(\d+)\.self_attn\.", r"layers.\1.mixer."),
         (r"model\.layers\.(\d+)\.conv\.", r"layers.\1.mixer.")]


_LFM2_BACK = [(r"embed\.", "model.embed_tokens."), (r"norm\.", "model.embedding_norm."), (r"lm_head\.", "lm_head."),
              (r"layers\.(\d+)\.mixer_norm\.", r"model.layers.\1.operator_norm."),
              (r"layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.ffn_norm."),
              (r"layers\.(\d+)\.mlp\.gate_proj\.", r"model.layers.\1.feed_forward.w1."),
              (r"layers\.(\d+)\.mlp\.up_proj\.", r"model.layers.\1.feed_forward.w3."),
              (r"layers\.(\d+)\.mlp\.down_proj\.", r"model.layers.\1.feed_forward.w2."),
              (r"layers\.(\d+)\.mixer\.o_proj\.", r"model.layers.\1.self_attn.out_proj."),
              (r"layers\.(\d+)\.mixer\.q_norm\.", r"model.layers.\1.self_attn.q_layernorm."),
              (r"layers\.(\d+)\.mixer\.k_norm\.", r"model.layers.\1.self_attn.k_layernorm."),
              (r"layers\.(\d+)\.mixer\.([qkv]_proj)\.", r"model.layers.\1.self_attn.\2."),
              (r"layers\.(\d+)\.mixer\.(in_proj|conv|out_proj)\.", r"model.layers.\1.conv.\2.")]


def _lfm2_hidden(config: dict[str, Any]) -> int:
    """The MLP width LFM2 builds from intermediate_size (its block_auto_adjust_ff_dim rule)."""
    hidden = config["intermediate_size"]
    if config.get("block_auto_adjust_ff_dim", True):
        hidden = int(2 * hidden / 3)
        multiplier, multiple = config.get("block_ffn_dim_multiplier", 1.0), config.get("block_multiple_of", 256)
        if multiplier is not None:
            hidden = multiple * ((int(multiplier * hidden) + multiple - 1) // multiple)
    return hidden


def _lfm2_spec(config: dict[str, Any]) -> LayoutSpec:
    eps, heads = config.get("norm_eps", 1e-5), config["num_attention_heads"]
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads", heads),
                 "qk_norm": True, "norm_eps": eps, "rope": {"theta": _rope_theta(config)}}
    conv = {"type": "short_conv", "conv_size": config.get("conv_L_cache", 3), "bias": bool(config.get("conv_bias", False))}
    kinds = {"full_attention": attention, "conv": conv}
    types = config.get("layer_types") or ["full_attention" if i in config.get("full_attn_idxs", []) else "conv"
                                          for i in range(config["num_hidden_layers"])]
    layers = []
    for i, kind in enumerate(types):
        if kind not in kinds:
            raise ValueError(f"lfm2 config.json layer_types[{i}] = {kind!r}: not conv or full_attention")
        layers.append({"mixer": kinds[kind], "mlp": {"type": "swiglu", "hidden": _lfm2_hidden(config)}})
    return LayoutSpec.model_validate({"d_model": config["hidden_size"], "vocab_size": config["vocab_size"], "layers": layers,
                                      "norm_eps": eps, "tie_embeddings": bool(config.get("tie_word_embeddings", True))})


def _lfm2_config(spec: LayoutSpec) -> dict[str, Any]:
    attn = next(layer.mixer for layer in spec.layers if layer.mixer.type == "attention")
    conv = next(layer.mixer for layer in spec.layers if layer.mixer.type == "short_conv")
    return {"model_type": "lfm2", "architectures": ["Lfm2ForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": spec.layers[0].mlp.hidden, "block_auto_adjust_ff_dim": False,
            "num_hidden_layers": spec.n_layers, "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads,
            "norm_eps": spec.norm_eps, "conv_L_cache": conv.conv_size, "conv_bias": conv.bias,
            "tie_word_embeddings": spec.tie_embeddings, "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope.theta},
            "layer_types": ["full_attention" if layer.mixer.type == "attention" else "conv" for layer in spec.layers]}


# ------------------------------------------------------------------------------------------------ bamba, jamba

# Bamba's and Jamba's names: input_layernorm / pre_ff_layernorm around each layer, mamba (as our mamba2 or
# mamba) or self_attn, feed_forward the MLP, final_layernorm the final norm.
_HYBRID = [(r"model\.embed_tokens\.", "embed."), (r"model\.final_layernorm\.", "norm."), (r"lm_head\.", "lm_head."),
           (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.mixer_norm."),
           (r"model\.layers\.(\d+)\.pre_ff_layernorm\.", r"layers.\1.mlp_norm."),
           (r"model\.layers\.(\d+)\.feed_forward\.", r"layers.\1.mlp."),
           (r"model\.layers\.(\d+)\.(mamba|self_attn)\.", r"layers.\1.mixer.")]
_SSM_PARAMETERS = r"((in_proj|conv1d|x_proj|dt_proj|out_proj|norm|dt_layernorm|b_layernorm|c_layernorm)\.|dt_bias$|A_log$|D$)"
_HYBRID_BACK = [(r"embed\.", "model.embed_tokens."), (r"norm\.", "model.final_layernorm."), (r"lm_head\.", "lm_head."),
                (r"layers\.(\d+)\.mixer_norm\.", r"model.layers.\1.input_layernorm."),
                (r"layers\.(\d+)\.mlp_norm\.", r"model.layers.\1.pre_ff_layernorm."),
                (r"layers\.(\d+)\.mlp\.", r"model.layers.\1.feed_forward."),
                (r"layers\.(\d+)\.mixer\." + _SSM_PARAMETERS, r"model.layers.\1.mamba.\2"),
                (r"layers\.(\d+)\.mixer\.", r"model.layers.\1.self_attn.")]


def _bamba_spec(config: dict[str, Any]) -> LayoutSpec:
    if config.get("mamba_proj_bias") or config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError("bamba config.json mamba_proj_bias, attention_bias or mlp_bias true: mixerzoo's layers have no such biases")
    eps, heads, d_inner = config.get("rms_norm_eps", 1e-5), config["num_attention_heads"], config.get("mamba_expand", 2) * config["hidden_size"]
    head_dim = config.get("mamba_d_head", "auto")
    head_dim = d_inner // config["mamba_n_heads"] if head_dim == "auto" else head_dim
    if config["mamba_n_heads"] * head_dim != d_inner:
        raise ValueError(f"bamba config.json mamba_n_heads x mamba_d_head = {config['mamba_n_heads']} x {head_dim} is not "
                         f"mamba_expand x hidden_size = {d_inner}")
    limit = [_number(x) for x in config.get("time_step_limit") or (0.0, float("inf"))]
    mamba2 = {"type": "mamba2", "d_state": config["mamba_d_state"], "d_conv": config.get("mamba_d_conv", 4),
              "expand": config.get("mamba_expand", 2), "head_dim": head_dim, "n_groups": config.get("mamba_n_groups", 1),
              "conv_bias": bool(config.get("mamba_conv_bias", True)), "dt_limit": limit, "norm_eps": eps}
    rope = config.get("rope_parameters") or {}
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads") or heads,
                 "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
                 "rope": {"theta": _rope_theta(config),
                          "fraction": rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))}}
    attention_layers = set(config.get("attn_layer_indices") or [])
    layers = [{"mixer": attention if i in attention_layers else mamba2,
               "mlp": {"type": "swiglu", "hidden": config["intermediate_size"]}} for i in range(config["num_hidden_layers"])]
    return LayoutSpec.model_validate({"d_model": config["hidden_size"], "vocab_size": config["vocab_size"], "layers": layers,
                                      "norm_eps": eps, "tie_embeddings": bool(config.get("tie_word_embeddings", False))})


def _bamba_config(spec: LayoutSpec) -> dict[str, Any]:
    attn = next((layer.mixer for layer in spec.layers if layer.mixer.type == "attention"), None)
    m = next(layer.mixer for layer in spec.layers if layer.mixer.type == "mamba2")
    attention = {} if attn is None else {
        "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads, "head_dim": attn.dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope.theta, "partial_rotary_factor": attn.rope.fraction}}
    return {"model_type": "bamba", "architectures": ["BambaForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": spec.layers[0].mlp.hidden, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": 1, **attention, "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings,
            "mamba_n_heads": m.expand * spec.d_model // m.head_dim, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_conv_bias": m.conv_bias,
            "mamba_proj_bias": False, "time_step_limit": list(m.dt_limit), "attention_bias": False, "mlp_bias": False,
            "attn_layer_indices": [i for i, layer in enumerate(spec.layers) if layer.mixer.type == "attention"]}


def _jamba_spec(config: dict[str, Any]) -> LayoutSpec:
    eps, heads, n_layers = config.get("rms_norm_eps", 1e-6), config["num_attention_heads"], config["num_hidden_layers"]
    rank = config.get("mamba_dt_rank", "auto")
    mamba = {"type": "mamba", "d_state": config.get("mamba_d_state", 16), "d_conv": config.get("mamba_d_conv", 4),
             "expand": config.get("mamba_expand", 2),
             "dt_rank": math.ceil(config["hidden_size"] / 16) if rank == "auto" else rank,
             "conv_bias": bool(config.get("mamba_conv_bias", True)), "bias": bool(config.get("mamba_proj_bias", False)),
             "inner_norm_eps": eps}
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads") or heads,
                 "head_dim": config["hidden_size"] // heads, "rope": {"kind": "none"}}
    dense = {"type": "swiglu", "hidden": config["intermediate_size"]}
    experts = {"type": "experts", "hidden": config["intermediate_size"], "n_experts": config.get("num_experts", 16),
               "top_k": config.get("num_experts_per_tok", 2), "normalize_top_k": False}
    attn_period, attn_offset = config.get("attn_layer_period", 8), config.get("attn_layer_offset", 4)
    moe_period, moe_offset = config.get("expert_layer_period", 2), config.get("expert_layer_offset", 1)
    layers = [{"mixer": attention if i % attn_period == attn_offset else mamba,
               "mlp": experts if i % moe_period == moe_offset and experts["n_experts"] > 1 else dense} for i in range(n_layers)]
    return LayoutSpec.model_validate({"d_model": config["hidden_size"], "vocab_size": config["vocab_size"], "layers": layers,
                                      "norm_eps": eps, "tie_embeddings": bool(config.get("tie_word_embeddings", False))})


def _jamba_to_ours(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    theirs = dict(tensors)
    ours = _experts_to_ours(theirs, spec, lambda i: f"model.layers.{i}.feed_forward.", router="router")
    return ours | _renamed(theirs, _HYBRID, "jamba")


def _jamba_to_theirs(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    ours = dict(tensors)
    theirs = _experts_to_theirs(ours, spec, lambda i: f"model.layers.{i}.feed_forward.", router="router")
    return theirs | _renamed(ours, _HYBRID_BACK, "mixerzoo")


def _period(flags: list[bool]) -> tuple[int, int]:
    """The (period, offset) with flags[i] == (i % period == offset) for every i (no flag set: an offset past
    the end); a ValueError when no such pair exists."""
    if not any(flags):
        return len(flags) + 1, len(flags)
    for period in range(1, len(flags) + 1):
        for offset in range(period):
            if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
                return period, offset
    raise ValueError("the layers are not periodic")


def _jamba_config(spec: LayoutSpec) -> dict[str, Any]:
    m = next(layer.mixer for layer in spec.layers if layer.mixer.type == "mamba")
    attn = next((layer.mixer for layer in spec.layers if layer.mixer.type == "attention"), None)
    experts = next((layer.mlp for layer in spec.layers if layer.mlp.type == "experts"), None)
    attn_period, attn_offset = _period([layer.mixer.type == "attention" for layer in spec.layers])
    moe_period, moe_offset = _period([layer.mlp.type == "experts" for layer in spec.layers])
    return {"model_type": "jamba", "architectures": ["JambaForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": spec.layers[0].mlp.hidden, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": attn.n_heads if attn else 1, "num_key_value_heads": attn.kv_heads if attn else 1,
            "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings,
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_dt_rank": m.rank,
            "mamba_conv_bias": m.conv_bias, "mamba_proj_bias": m.bias,
            "num_experts": experts.n_experts if experts else 1, "num_experts_per_tok": experts.top_k if experts else 1,
            "attn_layer_period": attn_period, "attn_layer_offset": attn_offset,
            "expert_layer_period": moe_period, "expert_layer_offset": moe_offset}


# ---------------------------------------------------------------------------------------------------- minimax

# MiniMax-01: lightning attention (one per-head interleaved qkv_proj, norm over all heads, sigmoid output_gate)
# or softmax attention, experts in every layer (Mixtral's w1 gate, w3 up, w2 down), and layers that add each
# output to its normed input with alpha / beta factors.
_MINIMAX = [(r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"layers.\1.mlp_norm."),
            (r"model\.layers\.(\d+)\.self_attn\.norm\.", r"layers.\1.mixer.o_norm."),
            (r"model\.layers\.(\d+)\.self_attn\.output_gate\.", r"layers.\1.mixer.g_proj."),
            (r"model\.layers\.(\d+)\.self_attn\.out_proj\.", r"layers.\1.mixer.o_proj."), *_SHARED]
_MINIMAX_BACK = [(r"layers\.(\d+)\.mixer\.o_norm\.", r"model.layers.\1.self_attn.norm."),
                 (r"layers\.(\d+)\.mixer\.g_proj\.", r"model.layers.\1.self_attn.output_gate."), *_SHARED_BACK]
_MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_LIGHTNING_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")  # derived from the layer index


def _minimax_spec(config: dict[str, Any]) -> LayoutSpec:
    heads, n_layers, eps = config["num_attention_heads"], config["num_hidden_layers"], config.get("rms_norm_eps", 1e-5)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads") or heads,
                 "head_dim": head_dim, "rope": {"theta": _rope_theta(config),
                                                "fraction": rope.get("partial_rotary_factor") or 1.0}}
    experts = {"type": "experts", "hidden": config["intermediate_size"], "n_experts": config.get("num_local_experts", 8),
               "top_k": config.get("num_experts_per_tok", 2)}
    layers = []
    for i, kind in enumerate(_require(config, "layer_types", "minimax")):
        if kind == "linear_attention":  # MiniMax's slopes shrink with depth by this factor
            mixer = {"type": "lightning", "n_heads": heads, "head_dim": head_dim, "norm_eps": 1e-6,
                     "decay_scale": 1 - i / (n_layers - 1 + 1e-5) + 1e-5}
            scales = (config.get("linear_attn_alpha_factor", 1), config.get("linear_attn_beta_factor", 1))
        elif kind == "full_attention":
            mixer, scales = attention, (config.get("full_attn_alpha_factor", 1), config.get("full_attn_beta_factor", 1))
        else:
            raise ValueError(f"minimax config.json layer_types[{i}] = {kind!r}: not linear_attention or full_attention")
        layers.append({"mixer": mixer, "mlp": experts, "residual": "normed", "mixer_scales": scales,
                       "mlp_scales": (config.get("mlp_alpha_factor", 1), config.get("mlp_beta_factor", 1))})
    return _model(config, layers)


def _minimax_to_ours(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    theirs = {name.replace(".block_sparse_moe.", ".mlp."): t for name, t in tensors.items()}
    ours = _experts_to_ours(theirs, spec, lambda i: f"model.layers.{i}.mlp.", names=_MIXTRAL_EXPERTS)
    for i, layer in enumerate(spec.layers):
        prefix, c = f"model.layers.{i}.self_attn.", layer.mixer
        if c.type != "lightning":
            continue
        slopes = theirs.pop(prefix + "slope_rate", None)
        for name in _LIGHTNING_BUFFERS[1:]:
            theirs.pop(prefix + name, None)
        ours_slopes = -Lightning.head_log_decay(c)
        if slopes is not None and not torch.allclose(slopes.double().flatten(), ours_slopes, rtol=1e-5):
            raise ValueError(f"minimax layer {i}: slope_rate {slopes.flatten().tolist()} is not MiniMax's for its depth "
                             f"({ours_slopes.tolist()})")
        q, k, v = theirs.pop(prefix + "qkv_proj.weight").unflatten(0, (c.n_heads, 3, c.key_dim)).unbind(1)
        ours |= {f"layers.{i}.mixer.{name}_proj.weight": t.flatten(0, 1) for name, t in zip("qkv", (q, k, v))}
    return ours | _renamed(theirs, _MINIMAX, "minimax")


def _minimax_to_theirs(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    ours = dict(tensors)
    theirs = _experts_to_theirs(ours, spec, lambda i: f"model.layers.{i}.block_sparse_moe.", names=_MIXTRAL_EXPERTS)
    for i, layer in enumerate(spec.layers):
        mine, c = f"layers.{i}.mixer.", layer.mixer
        if c.type != "lightning":
            continue
        q, k, v = (ours.pop(f"{mine}{name}_proj.weight").unflatten(0, (c.n_heads, c.key_dim)) for name in "qkv")
        theirs[f"model.layers.{i}.self_attn.qkv_proj.weight"] = torch.stack([q, k, v], 1).flatten(0, 2)
        theirs[f"model.layers.{i}.self_attn.out_proj.weight"] = ours.pop(mine + "o_proj.weight")
        theirs |= {f"model.layers.{i}.self_attn.{name}": t for name, t in _lightning_buffers(c, q.dtype).items()}
    return theirs | _renamed(ours, _MINIMAX_BACK, "mixerzoo")


_MINIMAX_BLOCK = 256  # the block length of MiniMax's chunked lightning attention, which its decay buffers span


def _lightning_buffers(c, dtype: torch.dtype) -> Tensors:
    """The decay buffers MiniMax's lightning attention keeps (slopes and their powers over one block), so the
    exported checkpoint is complete."""
    slopes = (-Lightning.head_log_decay(c))[:, None, None]  # [H, 1, 1]
    steps = torch.arange(1, _MINIMAX_BLOCK + 1, dtype=torch.float64)
    lags = slopes * (steps[:, None] - steps[None, :])  # [H, C, C]: slope x (i - j)
    buffers = {"slope_rate": slopes, "query_decay": torch.exp(-slopes * steps[:, None]),
               "key_decay": torch.exp(-slopes * (_MINIMAX_BLOCK - steps[:, None])),
               "diagonal_decay": torch.where(lags >= 0, torch.exp(-lags.clamp_min(0)), 0.0)[None]}
    return {name: t.to(dtype) for name, t in buffers.items()}


def _minimax_config(spec: LayoutSpec) -> dict[str, Any]:
    lightning = next(layer for layer in spec.layers if layer.mixer.type == "lightning")
    full = next((layer for layer in spec.layers if layer.mixer.type == "attention"), None)
    experts = spec.layers[0].mlp
    attention = {} if full is None else {
        "num_key_value_heads": full.mixer.kv_heads, "full_attn_alpha_factor": full.mixer_scales[0],
        "full_attn_beta_factor": full.mixer_scales[1],
        "rope_parameters": {"rope_type": "default", "rope_theta": full.mixer.rope.theta,
                            **({} if full.mixer.rope.fraction == 1 else {"partial_rotary_factor": full.mixer.rope.fraction})}}
    return {"model_type": "minimax", "architectures": ["MiniMaxForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": experts.hidden, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": lightning.mixer.n_heads, "head_dim": lightning.mixer.key_dim, **attention,
            "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings,
            "num_local_experts": experts.n_experts, "num_experts_per_tok": experts.top_k, "block_size": _MINIMAX_BLOCK,
            "linear_attn_alpha_factor": lightning.mixer_scales[0], "linear_attn_beta_factor": lightning.mixer_scales[1],
            "mlp_alpha_factor": lightning.mlp_scales[0], "mlp_beta_factor": lightning.mlp_scales[1],
            "layer_types": ["linear_attention" if layer.mixer.type == "lightning" else "full_attention" for layer in spec.layers]}


# ----------------------------------------------------------------------------------------- recurrent_gemma

# RecurrentGemma's names: temporal_pre_norm / channel_pre_norm around each layer, temporal_block the mixer
# (an RG-LRU block or local attention, parameter names as ours), mlp_block the GeGLU MLP, final_norm the
# final norm. Its RMSNorms scale by (1 + weight): ours hold that sum.
_RECURRENT_GEMMA = [(r"model\.embed_tokens\.", "embed."), (r"model\.final_norm\.", "norm."), (r"lm_head\.", "lm_head."),
                    (r"model\.layers\.(\d+)\.temporal_pre_norm\.", r"layers.\1.mixer_norm."),
                    (r"model\.layers\.(\d+)\.channel_pre_norm\.", r"layers.\1.mlp_norm."),
                    (r"model\.layers\.(\d+)\.mlp_block\.", r"layers.\1.mlp."),
                    (r"model\.layers\.(\d+)\.temporal_block\.", r"layers.\1.mixer.")]
_GEMMA_NORM = re.compile(r"(layers\.\d+\.(mixer|mlp)_norm|norm)\.weight$")


def _recurrent_gemma_spec(config: dict[str, Any]) -> LayoutSpec:
    d_model, heads, n_layers = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"recurrent_gemma config.json hidden_activation {config['hidden_activation']!r}: "
                         "mixerzoo's GeGLU is gelu_pytorch_tanh")
    rope = config.get("rope_parameters") or {}
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads") or heads,
                 "head_dim": d_model // heads, "window": config.get("attention_window_size", 2048),
                 "qkv_bias": bool(config.get("attention_bias", False)), "o_bias": True,
                 "rope": {"theta": _rope_theta(config), "fraction": rope.get("partial_rotary_factor", 0.5)}}
    recurrent = {"type": "rglru", "lru_width": config.get("lru_width") or d_model, "n_heads": heads,
                 "conv_size": config.get("conv1d_width", 4)}
    kinds = {"recurrent": recurrent, "attention": attention}
    types = (list(config.get("block_types") or ("recurrent", "recurrent", "attention")) * n_layers)[:n_layers]
    layers = []
    for i, kind in enumerate(types):
        if kind not in kinds:
            raise ValueError(f"recurrent_gemma config.json block_types: layer {i} is {kind!r}, not recurrent or attention")
        layers.append({"mixer": kinds[kind], "mlp": {"type": "swiglu", "hidden": config["intermediate_size"] // 2,
                                                     "bias": True, "activation": "gelu_tanh"}})
    cap = config.get("logits_soft_cap", 30.0)
    return LayoutSpec.model_validate({
        "d_model": d_model, "vocab_size": config["vocab_size"], "layers": layers, "norm_eps": config.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(config.get("tie_word_embeddings", True)), "logit_softcap": cap or None,
        "embed_scale": float(torch.tensor(d_model**0.5, dtype=torch.bfloat16))})  # its normaliser is a bfloat16


def _recurrent_gemma_to_ours(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    ours = _renamed(tensors, _RECURRENT_GEMMA, "recurrent_gemma")
    return {name: 1 + t.float() if _GEMMA_NORM.match(name) else t for name, t in ours.items()}


def _recurrent_gemma_to_theirs(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    theirs = {name: (t.float() - 1).to(t.dtype) if _GEMMA_NORM.match(name) else t for name, t in tensors.items()}
    return _renamed(theirs, _inverse(_RECURRENT_GEMMA), "mixerzoo")


def _recurrent_gemma_config(spec: LayoutSpec) -> dict[str, Any]:
    attn = next((layer.mixer for layer in spec.layers if layer.mixer.type == "attention"), None)
    lru = next(layer.mixer for layer in spec.layers if layer.mixer.type == "rglru")
    kinds = ["attention" if layer.mixer.type == "attention" else "recurrent" for layer in spec.layers]
    attention = {} if attn is None else {
        "num_key_value_heads": attn.kv_heads, "attention_window_size": attn.window, "attention_bias": attn.qkv_bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope.theta, "partial_rotary_factor": attn.rope.fraction}}
    return {"model_type": "recurrent_gemma", "architectures": ["RecurrentGemmaForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": 2 * spec.layers[0].mlp.hidden, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": lru.n_heads, **attention, "lru_width": lru.width, "conv1d_width": lru.conv_size,
            "block_types": kinds,
            "logits_soft_cap": spec.logit_softcap or 0.0, "rms_norm_eps": spec.norm_eps,
            "tie_word_embeddings": spec.tie_embeddings, "hidden_activation": "gelu_pytorch_tanh"}


# ---------------------------------------------------------------------------------------------- falcon_h1

# Falcon-H1's names: attention (self_attn) and Mamba2 (mamba) side by side in every layer, our parallel
# mixer's branches 0 and 1; feed_forward the MLP; the hybrid norms' names.
_FALCON_H1 = [(r"model\.embed_tokens\.", "embed."), (r"model\.final_layernorm\.", "norm."), (r"lm_head\.", "lm_head."),
              (r"model\.layers\.(\d+)\.input_layernorm\.", r"layers.\1.mixer_norm."),
              (r"model\.layers\.(\d+)\.pre_ff_layernorm\.", r"layers.\1.mlp_norm."),
              (r"model\.layers\.(\d+)\.feed_forward\.", r"layers.\1.mlp."),
              (r"model\.layers\.(\d+)\.self_attn\.", r"layers.\1.mixer.branches.0."),
              (r"model\.layers\.(\d+)\.mamba\.", r"layers.\1.mixer.branches.1.")]


def _falcon_h1_ssm(config: dict[str, Any]) -> tuple[int, int]:
    """Falcon-H1's Mamba2 width (mamba_d_ssm, else mamba_expand x hidden_size) and head dim."""
    d_ssm = config.get("mamba_d_ssm") or int(config.get("mamba_expand", 2) * config["hidden_size"])
    head_dim = config.get("mamba_d_head", "auto")
    return d_ssm, d_ssm // config["mamba_n_heads"] if head_dim == "auto" else head_dim


def _falcon_h1_spec(config: dict[str, Any]) -> LayoutSpec:
    for key in ("mamba_proj_bias", "projectors_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"falcon_h1 config.json {key} true: mixerzoo's Mamba2 and SwiGLU have no such biases")
    if config.get("tie_word_embeddings") and config.get("lm_head_multiplier", 1.0) != 1.0:
        raise ValueError("falcon_h1 config.json lm_head_multiplier with tied embeddings: the head cannot hold it")
    d_model, heads, eps = config["hidden_size"], config["num_attention_heads"], config.get("rms_norm_eps", 1e-5)
    d_ssm, head_dim = _falcon_h1_ssm(config)
    if config["mamba_n_heads"] * head_dim != d_ssm:
        raise ValueError(f"falcon_h1 config.json mamba_n_heads x mamba_d_head = {config['mamba_n_heads']} x {head_dim} "
                         f"is not the Mamba2 width {d_ssm}")
    expand = config.get("mamba_expand", 2)
    gate_norm = ("before_gate" if config.get("mamba_norm_before_gate", True) else "after_gate") if config.get(
        "mamba_rms_norm", False) else "none"
    mamba2 = {"type": "mamba2", "d_state": config["mamba_d_state"], "d_conv": config.get("mamba_d_conv", 4), "expand": expand,
              "d_ssm": None if d_ssm == expand * d_model else d_ssm, "head_dim": head_dim,
              "n_groups": config.get("mamba_n_groups", 1), "conv_bias": bool(config.get("mamba_conv_bias", True)),
              "dt_limit": [_number(x) for x in config.get("time_step_limit") or (0.0, float("inf"))], "norm_eps": eps,
              "gate_norm": gate_norm}
    bias = bool(config.get("attention_bias", False))
    attention = {"type": "attention", "n_heads": heads, "n_kv_heads": config.get("num_key_value_heads") or heads,
                 "head_dim": config.get("head_dim") or d_model // heads, "qkv_bias": bias, "o_bias": bias,
                 "rope": {"theta": _rope_theta(config)}}
    scales = [config.get("attention_out_multiplier", 1.0), config.get("ssm_out_multiplier", 1.0)]
    mixer = {"type": "parallel", "mixers": [attention, mamba2], "output_scales": None if scales == [1.0, 1.0] else scales}
    layer = {"mixer": mixer, "mlp": {"type": "swiglu", "hidden": config["intermediate_size"]}}
    return LayoutSpec.model_validate({
        "d_model": d_model, "vocab_size": config["vocab_size"], "layers": [layer] * config["num_hidden_layers"],
        "norm_eps": eps, "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "embed_scale": config.get("embedding_multiplier", 1.0)})


def _falcon_h1_fold(tensors: Tensors, config: dict[str, Any]) -> Tensors:
    """Falcon-H1's µP multipliers that scale a projection's input or output, folded into its weights: the
    attention input (q, k, v) and key multipliers, the SSM input multiplier and per-section (z, x, B, C, dt)
    multipliers of in_proj, the MLP's gate and down multipliers, and the LM head's."""
    d_ssm, _ = _falcon_h1_ssm(config)
    bc = config.get("mamba_n_groups", 1) * config["mamba_d_state"]
    z, x, b, c, dt = config.get("ssm_multipliers") or [1.0] * 5
    sections = torch.cat([torch.full((n,), float(m)) for n, m in
                          ((d_ssm, z), (d_ssm, x), (bc, b), (bc, c), (config["mamba_n_heads"], dt))])
    attn_in, key = config.get("attention_in_multiplier", 1.0), config.get("key_multiplier", 1.0)
    gate, down = config.get("mlp_multipliers") or [1.0, 1.0]
    rules = [(r"self_attn\.[qv]_proj\.weight$", attn_in), (r"self_attn\.k_proj\.weight$", attn_in * key),
             (r"self_attn\.k_proj\.bias$", key), (r"feed_forward\.gate_proj\.weight$", gate),
             (r"feed_forward\.down_proj\.weight$", down), (r"^lm_head\.weight$", config.get("lm_head_multiplier", 1.0)),
             (r"mamba\.in_proj\.weight$", config.get("ssm_in_multiplier", 1.0) * sections[:, None])]
    out = dict(tensors)
    for name, tensor in tensors.items():
        for pattern, multiplier in rules:
            if re.search(pattern, name):
                out[name] = (tensor.float() * multiplier).to(tensor.dtype)
    return out


def _falcon_h1_config(spec: LayoutSpec) -> dict[str, Any]:
    attn, m = spec.layers[0].mixer.mixers
    scales = spec.layers[0].mixer.scales
    return {"model_type": "falcon_h1", "architectures": ["FalconH1ForCausalLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "intermediate_size": spec.layers[0].mlp.hidden, "num_hidden_layers": spec.n_layers,
            "num_attention_heads": attn.n_heads, "num_key_value_heads": attn.kv_heads, "head_dim": attn.dim,
            "attention_bias": attn.qkv_bias, "rope_parameters": {"rope_type": "default", "rope_theta": attn.rope.theta},
            "mamba_d_ssm": m.d_inner, "mamba_n_heads": m.n_heads, "mamba_d_head": m.head_dim, "mamba_n_groups": m.n_groups,
            "mamba_d_state": m.d_state, "mamba_d_conv": m.d_conv, "mamba_expand": m.expand, "mamba_conv_bias": m.conv_bias,
            "mamba_proj_bias": False, "projectors_bias": False, "mlp_bias": False, "time_step_limit": list(m.dt_limit),
            "mamba_rms_norm": m.gate_norm != "none", "mamba_norm_before_gate": m.gate_norm == "before_gate",
            "rms_norm_eps": spec.norm_eps, "tie_word_embeddings": spec.tie_embeddings, "hidden_act": "silu",
            "embedding_multiplier": spec.embed_scale, "attention_out_multiplier": scales[0], "ssm_out_multiplier": scales[1],
            "lm_head_multiplier": 1.0, "key_multiplier": 1.0, "attention_in_multiplier": 1.0, "ssm_in_multiplier": 1.0,
            "mlp_multipliers": [1.0, 1.0], "ssm_multipliers": [1.0] * 5}


# ------------------------------------------------------------------------ flash-linear-attention's models

# fla's names: attn_norm / mlp_norm around each layer, attn the mixer (parameter names as ours but GLA's
# output norm), mlp the SwiGLU, embeddings and norm at the ends.
_FLA = [(r"model\.embeddings\.", "embed."), (r"model\.norm\.", "norm."), (r"lm_head\.", "lm_head."),
        (r"model\.layers\.(\d+)\.attn_norm\.", r"layers.\1.mixer_norm."),
        (r"model\.layers\.(\d+)\.mlp_norm\.", r"layers.\1.mlp_norm."),
        (r"model\.layers\.(\d+)\.mlp\.", r"layers.\1.mlp."),
        (r"model\.layers\.(\d+)\.attn\.", r"layers.\1.mixer.")]
_GLA_NORM = (r"model\.layers\.(\d+)\.attn\.g_norm(_swish_gate)?\.", r"layers.\1.mixer.o_norm.")
# fla's defaults where its config.json leaves a field out
_FLA_DEFAULTS = {"hidden_ratio": 4, "intermediate_size": None, "hidden_act": "swish", "norm_eps": 1e-6, "attn": None,
                 "tie_word_embeddings": False, "conv_size": 4}


def _fla_refuse(config: dict[str, Any], **expected: Any) -> None:
    """A one-line error for the first config field whose value no mixerzoo mixer reproduces."""
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"{config['model_type']} config.json {key} = {config[key]!r}: mixerzoo's mixer maps only {value!r}")


def _fla_spec(config: dict[str, Any], mixer: dict[str, Any]) -> LayoutSpec:
    """An fla model of one mixer type in every layer, each with fla's SwiGLU (its width rule when unset)."""
    config = _FLA_DEFAULTS | config
    if config["attn"]:
        raise ValueError(f"{config['model_type']} config.json attn: fla's softmax attention layers run only with "
                         "flash-attn and are not mapped")
    _fla_refuse(config, hidden_act="swish")
    hidden = config["intermediate_size"] or 256 * -(-int(config["hidden_size"] * config["hidden_ratio"] * 2 / 3) // 256)
    layer = {"mixer": mixer | {"norm_eps": config["norm_eps"]}, "mlp": {"type": "swiglu", "hidden": hidden}}
    return LayoutSpec.model_validate({
        "d_model": config["hidden_size"], "vocab_size": config["vocab_size"], "layers": [layer] * config["num_hidden_layers"],
        "norm_eps": config["norm_eps"], "tie_embeddings": bool(config["tie_word_embeddings"])})


def _fla_mixer(spec: LayoutSpec, mixer_type: str, holds: bool = True):
    """The one mixer of an fla-shaped spec (`mixer_type`, one eps everywhere, `holds`), else ValueError."""
    m, first = spec.layers[0].mixer, spec.layers[0].model_dump()
    if not (m.type == mixer_type and holds and spec.norm_eps == m.norm_eps and spec.layers[0].mlp.type == "swiglu"
            and all(layer.model_dump() == first for layer in spec.layers)):
        raise ValueError(f"not an fla {mixer_type} model: one such mixer and a SwiGLU in every layer, one norm eps")
    return m


def _fla_config(spec: LayoutSpec, model_type: str, architecture: str, mixer: dict[str, Any]) -> dict[str, Any]:
    m = spec.layers[0].mixer
    return {"model_type": model_type, "architectures": [architecture], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": spec.n_layers, "intermediate_size": spec.layers[0].mlp.hidden,
            "hidden_act": "swish", "norm_eps": m.norm_eps, "tie_word_embeddings": spec.tie_embeddings, "attn": None,
            "num_heads": m.n_heads, **mixer}


def _gated_deltanet_fla_spec(config: dict[str, Any]) -> LayoutSpec:
    _fla_refuse(config, use_gate=True, use_short_conv=True, output_gate_activation="swish")
    return _fla_spec(config, {"type": "gated_deltanet", "n_heads": config["num_heads"], "head_dim": config.get("head_dim", 256),
                              "n_v_heads": config.get("num_v_heads"), "expand_v": config.get("expand_v", 2.0),
                              "conv_size": config.get("conv_size", 4), "allow_neg_eigval": config.get("allow_neg_eigval", False)})


def _gated_deltanet_fla_config(spec: LayoutSpec) -> dict[str, Any]:
    m = _fla_mixer(spec, "gated_deltanet", holds=not getattr(spec.layers[0].mixer, "conv_bias", True))
    return _fla_config(spec, "gated_deltanet", "GatedDeltaNetForCausalLM", {
        "head_dim": m.key_dim, "num_v_heads": m.value_heads, "expand_v": m.expand_v, "use_gate": True, "use_short_conv": True,
        "conv_size": m.conv_size, "allow_neg_eigval": m.allow_neg_eigval, "output_gate_activation": "swish"})


def _fla_widths(config: dict[str, Any], expand_k: float, expand_v: float) -> dict[str, Any]:
    """fla's key and value widths (hidden x expand_k, x expand_v) as our head_dim and expand_v."""
    key, value = int(config["hidden_size"] * config.get("expand_k", expand_k)), int(config["hidden_size"] * config.get("expand_v", expand_v))
    return {"n_heads": config["num_heads"], "head_dim": key // config["num_heads"], "expand_v": value / key}


def _fla_expands(spec: LayoutSpec) -> dict[str, float]:
    m = spec.layers[0].mixer
    return {"expand_k": m.n_heads * m.key_dim / spec.d_model, "expand_v": m.n_heads * m.value_dim / spec.d_model}


def _gla_fla_spec(config: dict[str, Any]) -> LayoutSpec:
    _fla_refuse(config, num_kv_heads=None, feature_map=None, clamp_min=None, use_gk=True, use_gv=False,
                elementwise_affine=True)
    return _fla_spec(config, {"type": "gla", **_fla_widths(config, 0.5, 1.0), "gate_low_rank": 16, "gate_logit_normalizer": 16,
                              "conv_size": config.get("conv_size", 4) if config.get("use_short_conv", False) else 0,
                              "output_gate": "silu" if config.get("use_output_gate", True) else "none"})


def _gla_fla_config(spec: LayoutSpec) -> dict[str, Any]:
    first = spec.layers[0].mixer
    m = _fla_mixer(spec, "gla", holds=getattr(first, "gate_low_rank", None) == 16 and getattr(
        first, "gate_logit_normalizer", None) == 16 and first.output_gate != "sigmoid")
    return _fla_config(spec, "gla", "GLAForCausalLM", {
        **_fla_expands(spec), "num_kv_heads": None, "feature_map": None, "use_short_conv": m.conv_size > 0,
        "conv_size": m.conv_size or 4, "use_output_gate": m.output_gate == "silu", "use_gk": True, "use_gv": False,
        "elementwise_affine": True, "clamp_min": None})


def _gla_fla_to_theirs(tensors: Tensors, spec: LayoutSpec) -> Tensors:
    norm = "g_norm_swish_gate" if spec.layers[0].mixer.output_gate == "silu" else "g_norm"
    return _renamed(tensors, [(r"layers\.(\d+)\.mixer\.o_norm\.", rf"model.layers.\1.attn.{norm}."), *_inverse(_FLA)], "mixerzoo")


def _delta_net_fla_spec(config: dict[str, Any]) -> LayoutSpec:
    _fla_refuse(config, use_beta=True, use_output_norm=True, use_short_conv=True, qk_norm="l2", qk_activation="silu")
    return _fla_spec(config, {"type": "deltanet", **_fla_widths(config, 1.0, 1.0), "conv_size": config.get("conv_size", 4),
                              "output_gate": "silu" if config.get("use_gate", False) else "none",
                              "allow_neg_eigval": config.get("allow_neg_eigval", False)})


def _delta_net_fla_config(spec: LayoutSpec) -> dict[str, Any]:
    first = spec.layers[0].mixer
    m = _fla_mixer(spec, "deltanet", holds=getattr(first, "conv_size", 0) > 0 and getattr(first, "output_gate", None) != "sigmoid")
    return _fla_config(spec, "delta_net", "DeltaNetForCausalLM", {
        **_fla_expands(spec), "use_gate": m.output_gate == "silu", "use_beta": True, "use_output_norm": True,
        "use_short_conv": True, "conv_size": m.conv_size, "qk_norm": "l2", "qk_activation": "silu",
        "allow_neg_eigval": m.allow_neg_eigval})


def _fla_family(spec, config, architecture, to_theirs=None) -> Family:
    return Family(spec, lambda t, s: _renamed(t, [_GLA_NORM, *_FLA], "fla"),
                  to_theirs or (lambda t, s: _renamed(t, _inverse(_FLA), "mixerzoo")), config, architecture)


FAMILIES: dict[str, Family] = {
    "llama": _dense_family("llama", qkv_bias=False, qk_norm=False, architecture="LlamaForCausalLM"),
    "qwen2": _dense_family("qwen2", qkv_bias=True, qk_norm=False, architecture="Qwen2ForCausalLM"),
    "qwen3": _dense_family("qwen3", qkv_bias=False, qk_norm=True, architecture="Qwen3ForCausalLM"),
    "qwen3_next": Family(_qwen3_next_spec, _qwen3_next_to_ours, _qwen3_next_to_theirs, _qwen3_next_config,
                         "Qwen3NextForCausalLM"),
    "mamba": _backbone_family(_mamba_spec, _mamba_config, "MambaForCausalLM"),
    "mamba2": _backbone_family(_mamba2_spec, _mamba2_config, "Mamba2ForCausalLM"),
    "lfm2": Family(_lfm2_spec, lambda t, s: _renamed(t, _LFM2, "lfm2"), lambda t, s: _renamed(t, _LFM2_BACK, "mixerzoo"),
                   _lfm2_config, "Lfm2ForCausalLM"),
    "bamba": Family(_bamba_spec, lambda t, s: _renamed(t, _HYBRID, "bamba"), lambda t, s: _renamed(t, _HYBRID_BACK, "mixerzoo"),
                    _bamba_config, "BambaForCausalLM"),
    "jamba": Family(_jamba_spec, _jamba_to_ours, _jamba_to_theirs, _jamba_config, "JambaForCausalLM"),
    "minimax": Family(_minimax_spec, _minimax_to_ours, _minimax_to_theirs, _minimax_config, "MiniMaxForCausalLM"),
    "recurrent_gemma": Family(_recurrent_gemma_spec, _recurrent_gemma_to_ours, _recurrent_gemma_to_theirs,
                              _recurrent_gemma_config, "RecurrentGemmaForCausalLM"),
    "falcon_h1": Family(_falcon_h1_spec, lambda t, s: _renamed(t, _FALCON_H1, "falcon_h1"),
                        lambda t, s: _renamed(t, _inverse(_FALCON_H1), "mixerzoo"), _falcon_h1_config,
                        "FalconH1ForCausalLM", fold=_falcon_h1_fold),
    "gated_deltanet": _fla_family(_gated_deltanet_fla_spec, _gated_deltanet_fla_config, "GatedDeltaNetForCausalLM"),
    "gla": _fla_family(_gla_fla_spec, _gla_fla_config, "GLAForCausalLM", _gla_fla_to_theirs),
    "delta_net": _fla_family(_delta_net_fla_spec, _delta_net_fla_config, "DeltaNetForCausalLM"),
}


def family_of(spec: LayoutSpec) -> str:
    """The transformers family that writes `spec` exactly, or NATIVE when none does."""
    for name, flags in (("llama", (False, False)), ("qwen2", (True, False)), ("qwen3", (False, True))):
        if _dense_holds(spec, qkv_bias=flags[0], qk_norm=flags[1]):
            return name
    for name in ("mamba", "mamba2"):
        if _ssm_holds(spec, name):
            return name
    for name in ("lfm2", "bamba", "jamba", "minimax", "qwen3_next", "recurrent_gemma", "falcon_h1", "gated_deltanet",
                 "gla", "delta_net"):
        if _round_trips(spec, FAMILIES[name].spec, FAMILIES[name].config):
            return name
    return NATIVE


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Decoder:
    """The Decoder a transformers causal-LM folder (or mixerzoo's own folder format) describes, its weights
    loaded; every checkpoint tensor must map and every model weight must be given."""
    config, tensors = read_checkpoint(path)
    model_type = config.get("model_type")
    if model_type == NATIVE:
        spec, weights = LayoutSpec.model_validate(config["spec"]), tensors
    elif model_type in FAMILIES:
        family = FAMILIES[model_type]
        spec = family.spec(config)
        weights = family.to_ours(tensors if family.fold is None else family.fold(tensors, config), spec)
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not one mixerzoo reads; it reads "
                         f"{sorted(FAMILIES) + [NATIVE]}")
    if spec.tie_embeddings:
        weights.pop("lm_head.weight", None)  # the head is the embeddings
    model = Decoder(spec)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise KeyError(f"{path}: the checkpoint gives no {missing[0]!r} ({len(missing)} weights missing)")
    for name, tensor in weights.items():
        if name not in expected:
            raise KeyError(f"{path}: {name!r} maps to no weight of the {model_type} model")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name!r} has shape {list(tensor.shape)}, the config says "
                             f"{list(expected[name].shape)}")
    model.load_state_dict(weights, strict=True)
    return model if dtype is None else model.to(dtype)


def save_pretrained(model: Decoder, path: str | os.PathLike) -> str:
    """Write `model` as the transformers folder of its family (config.json + model.safetensors), or in mixerzoo's
    own format when no family holds its layout; each file atomically. Returns the model_type written."""
    path = Path(path)
    spec, weights = model.spec, {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    model_type = family_of(spec)
    if model_type == NATIVE:
        config = {"model_type": NATIVE, "spec": spec.model_dump(mode="json")}
    else:
        family = FAMILIES[model_type]
        config = family.config(spec) | {"torch_dtype": str(next(iter(weights.values())).dtype).removeprefix("torch.")}
        weights = family.to_theirs(weights, spec)
    if spec.tie_embeddings:
        weights.pop("lm_head.weight", None)
    weights = {name: t.contiguous() for name, t in weights.items()}  # views of one tensor (a split) saved apart
    atomic_save_safetensors(weights, path / "model.safetensors", {"format": "pt"})
    atomic_write_bytes(path / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
    return model_type
