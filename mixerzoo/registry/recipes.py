"""Recipes: named spec factories, each at sizes tiny (tests), small (CPU experiments) and paper.

Every recipe shares one size table (width, depth, heads, MLP, vocab) and differs only in
its layer pattern, so an ablation changes exactly one thing: the token mixers (a published hybrid
also takes what its release changed beyond the pattern, as Jamba's experts, said in its docstring). At paper
size the shapes are Qwen2.5-VL-3B's LLM (the InfiniteVL teacher), whose LM head is tied to
the embeddings; tiny and small have their own head, so their embeddings start as unit-RMS
codes (Decoder.init_weights): a tied tiny model has to start its embeddings at 1/sqrt(d)
and stayed on the MQAR plateau where the untied one learnt (docs/studies/initialisation.md).
"""

from __future__ import annotations

from typing import Callable

from mixerzoo.blocks import LayoutSpec
from mixerzoo.errors import close_matches

SIZES = ("tiny", "small", "paper")

# Per size: model shape, and the legend letter -> mixer spec every recipe draws from.
# F full attention, S sliding-window attention, G Gated DeltaNet, M Mamba2; the landmark hybrids' families:
# A gated full attention, a quarter of each head rotary (Qwen3-Next), L lightning attention (MiniMax),
# N Mamba1, R RG-LRU (Griffin), C gated short conv (LFM2), K KDA (Kimi Linear), W RWKV-7, D multi-head
# latent attention (NoPE, as Kimi Linear's), H attention beside Mamba2 in one layer (Falcon-H1).
_SHAPES = {
    "tiny": dict(d_model=64, vocab_size=256, n_layers=8, mlp_hidden=128),
    "small": dict(d_model=512, vocab_size=8192, n_layers=8, mlp_hidden=1408),
    "paper": dict(d_model=2048, vocab_size=151936, n_layers=36, mlp_hidden=11008),
}
_LEGENDS = {
    "tiny": {
        "F": dict(type="attention", n_heads=4, n_kv_heads=2, head_dim=16, qkv_bias=True),
        "S": dict(type="attention", n_heads=4, n_kv_heads=2, head_dim=16, qkv_bias=True, window=16),
        "G": dict(type="gated_deltanet", n_heads=2, head_dim=16, expand_v=2, chunk_size=16),
        "M": dict(type="mamba2", d_state=16, head_dim=16, expand=2, chunk_size=16),
        "A": dict(type="attention", n_heads=4, n_kv_heads=2, head_dim=16, output_gate=True, qk_norm=True,
                  rope=dict(fraction=0.25)),
        "L": dict(type="lightning", n_heads=4, chunk_size=16),
        "N": dict(type="mamba", d_state=16, expand=2),
        "R": dict(type="rglru", n_heads=4),
        "C": dict(type="short_conv", conv_size=3),
        "K": dict(type="kda", n_heads=2, head_dim=16, chunk_size=16),
        "W": dict(type="rwkv7", n_heads=2),
        "D": dict(type="mla", n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope=dict(kind="none")),
        "H": dict(type="parallel", mixers=[dict(type="attention", n_heads=4, n_kv_heads=2, head_dim=16), dict(type="mamba2", d_state=16, head_dim=16, expand=2, chunk_size=16)]),
    },
    "small": {
        "F": dict(type="attention", n_heads=8, n_kv_heads=2, head_dim=64, qkv_bias=True),
        "S": dict(type="attention", n_heads=8, n_kv_heads=2, head_dim=64, qkv_bias=True, window=512),
        "G": dict(type="gated_deltanet", n_heads=4, head_dim=64, expand_v=2),
        "M": dict(type="mamba2", d_state=64, head_dim=64, expand=2, chunk_size=64),
        "A": dict(type="attention", n_heads=8, n_kv_heads=2, head_dim=64, output_gate=True, qk_norm=True,
                  rope=dict(fraction=0.25)),
        "L": dict(type="lightning", n_heads=8),
        "N": dict(type="mamba", d_state=16, expand=2),
        "R": dict(type="rglru", n_heads=8),
        "C": dict(type="short_conv", conv_size=3),
        "K": dict(type="kda", n_heads=4, head_dim=64),
        "W": dict(type="rwkv7", n_heads=8),
        "D": dict(type="mla", n_heads=8, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                  rope=dict(kind="none")),
        "H": dict(type="parallel", mixers=[dict(type="attention", n_heads=8, n_kv_heads=2, head_dim=64), dict(type="mamba2", d_state=64, head_dim=64, expand=2, chunk_size=64)]),
    },
    "paper": {
        "F": dict(type="attention", n_heads=16, n_kv_heads=2, head_dim=128, qkv_bias=True,
                  rope=dict(kind="mrope", sections=[16, 24, 24], theta=1e6)),
        "S": dict(type="attention", n_heads=16, n_kv_heads=2, head_dim=128, qkv_bias=True, window=8192,
                  rope=dict(kind="mrope", sections=[16, 24, 24], theta=1e6)),
        "G": dict(type="gated_deltanet", n_heads=16, head_dim=128, expand_v=2, conv_size=4),
        "M": dict(type="mamba2", d_state=128, head_dim=64, expand=2, chunk_size=256),
        "A": dict(type="attention", n_heads=16, n_kv_heads=2, head_dim=128, output_gate=True, qk_norm=True,
                  rope=dict(fraction=0.25)),
        "L": dict(type="lightning", n_heads=16),
        "N": dict(type="mamba", d_state=16, expand=2),
        "R": dict(type="rglru", n_heads=16),
        "C": dict(type="short_conv", conv_size=3),
        "K": dict(type="kda", n_heads=16, head_dim=128),
        "W": dict(type="rwkv7", n_heads=32),
        "D": dict(type="mla", n_heads=16, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  rope=dict(kind="none")),
        "H": dict(type="parallel", mixers=[dict(type="attention", n_heads=16, n_kv_heads=2, head_dim=128), dict(type="mamba2", d_state=128, head_dim=64, expand=2, chunk_size=256)]),
    },
}

_RECIPES: dict[str, Callable[[str], LayoutSpec]] = {}


def register_recipe(name: str) -> Callable[[Callable[[str], LayoutSpec]], Callable[[str], LayoutSpec]]:
    """Decorator registering `factory(size) -> LayoutSpec` under `name`."""

    def decorate(factory: Callable[[str], LayoutSpec]) -> Callable[[str], LayoutSpec]:
        if name in _RECIPES:
            raise ValueError(f"recipe {name!r} is already registered")
        _RECIPES[name] = factory
        return factory

    return decorate


def recipe(name: str, size: str = "tiny") -> LayoutSpec:
    """The spec of recipe `name` at `size`."""
    if name not in _RECIPES:
        raise KeyError(f"unknown recipe {name!r}{close_matches(str(name), list_recipes())}; registered: {list_recipes()}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {SIZES}")
    return _RECIPES[name](size)


def list_recipes() -> list[str]:
    """Registered recipe names."""
    return sorted(_RECIPES)


def layout(size: str, *, pattern: str | None = None, ratio: dict[str, int] | None = None,
           n_layers: int | None = None) -> LayoutSpec:
    """A spec at `size` from a pattern (or ratio) over the shared legend; `n_layers` overrides the size's depth."""
    shape = _SHAPES[size]
    legend = {letter: spec for letter, spec in _LEGENDS[size].items() if letter in (pattern or "".join(ratio or {}))}
    data = dict(
        d_model=shape["d_model"], vocab_size=shape["vocab_size"], n_layers=n_layers or shape["n_layers"], legend=legend,
        mlp=dict(type="swiglu", hidden=shape["mlp_hidden"]), norm_eps=1e-6, tie_embeddings=size == "paper",
    )
    data.update(pattern=pattern) if pattern else data.update(ratio=ratio)
    return LayoutSpec.model_validate(data)


def _pattern_recipe(name: str, pattern: str, doc: str, published_layers: int | None = None) -> None:
    """Register `name`: `pattern` repeated over each size's depth; a published hybrid (`published_layers`) takes
    that depth at paper size (the widths stay the shared size table's), its pattern cut after the last layer."""

    def factory(size: str) -> LayoutSpec:
        if published_layers is None:
            return layout(size, pattern=pattern)
        n_layers = published_layers if size == "paper" else _SHAPES[size]["n_layers"]
        cut = (pattern * -(-n_layers // len(pattern)))[:n_layers]  # the pattern cut after n_layers, as published
        return layout(size, pattern=cut, n_layers=n_layers)

    factory.__doc__ = doc
    register_recipe(name)(factory)


_pattern_recipe("transformer", "F", "All full attention (Qwen2.5-3B LLM shapes at paper size).")
_pattern_recipe("infinitevl", "SGGG", "InfiniteVL: layer i is SWA if i % 4 == 0, else Gated DeltaNet.")
_pattern_recipe("infinitevl-full", "FGGG", "InfiniteVL with full attention in place of SWA (1:3).")
_pattern_recipe("infinitevl-1to1", "SG", "InfiniteVL at SWA:GDN 1:1.")
_pattern_recipe("swa", "S", "All sliding-window attention.")
_pattern_recipe("gdn", "G", "All Gated DeltaNet.")
_pattern_recipe("mamba2", "M", "All Mamba2 (with the shared SwiGLU MLP, so only the mixer differs).")
_pattern_recipe("mamba2-swa", "MMMS", "Mamba2 + SWA, 3:1.")


@register_recipe("infinitevl-1to7")
def _infinitevl_1to7(size: str) -> LayoutSpec:
    """InfiniteVL at SWA:GDN 1:7, SWA layers spread evenly."""
    return layout(size, ratio={"S": 1, "G": 7})


# Published hybrids (tiny / small at their 8 layers, paper at the published depth).
_pattern_recipe("qwen3-next", "GGGA", "Qwen3-Next (Qwen team, 2025; Qwen3-Next-80B-A3B config.json): 3 Gated "
                "DeltaNet layers to 1 gated attention layer, 48 layers.", published_layers=48)
@register_recipe("minimax")
def _minimax(size: str) -> LayoutSpec:
    """MiniMax-01 (MiniMax 2025, arXiv:2501.08313; MiniMax-Text-01 config.json): 7 lightning attention layers (their
    slopes shrinking with depth) to 1 softmax attention layer without biases, 32 experts (top-2, renormalised; at tiny
    and small 4 of half the MLP's width, as many weights per token as it) in every layer, and layers that add each output to its normed input, the input scaled by (2 n_layers)^(1/4)
    (3.56 at its 80 layers, DeepNorm's alpha), 80 layers."""
    n_layers = 80 if size == "paper" else _SHAPES[size]["n_layers"]
    data = layout(size, pattern="LLLLLLLF", n_layers=n_layers).model_dump(mode="json")
    alpha = (2 * n_layers) ** 0.25
    for i, layer in enumerate(data["layers"]):
        if layer["mixer"]["type"] == "lightning":
            layer["mixer"].update(norm_eps=1e-6, decay_scale=1 - i / (n_layers - 1 + 1e-5) + 1e-5)
        else:
            layer["mixer"]["qkv_bias"] = False
        hidden = layer["mlp"]["hidden"] // (1 if size == "paper" else 2)  # tiny, small: the MLP's weights per token
        layer.update(mlp=_experts(size, hidden, published=32), residual="normed",
                     mixer_scales=(alpha, 1.0), mlp_scales=(alpha, 1.0))
    return LayoutSpec.model_validate(data)


_pattern_recipe("samba", "NS", "Samba (Ren et al. 2024, arXiv:2406.07522): Mamba1 and sliding-window attention "
                "alternating (each with its MLP), 32 layers at 3.8B.", published_layers=32)
_pattern_recipe("griffin", "RRS", "Griffin / RecurrentGemma-2B (De et al. 2024, arXiv:2402.19427): 2 RG-LRU "
                "blocks to 1 local attention block, 26 layers (the pattern cut after 26, as published).",
                published_layers=26)
def _experts(size: str, hidden: int, *, published: int, **fields) -> dict:
    """A top-2 experts MLP of `hidden`-wide experts: the published expert count at paper size, 4 at tiny and small."""
    return {"type": "experts", "hidden": hidden, "n_experts": published if size == "paper" else 4, "top_k": 2, **fields}


@register_recipe("jamba")
def _jamba(size: str) -> LayoutSpec:
    """Jamba (Lieber et al. 2024, arXiv:2403.19887; Jamba-v0.1 config.json): attention at layer i % 8 == 4 among
    Mamba1 layers with RMSNorms on dt, B and C, the attention without positions (NoPE) or biases, and 16 experts
    (top-2 softmax probabilities, not renormalised; 4 at tiny and small) as wide as the MLP in its place at
    every odd layer, 32 layers."""
    n_layers = 32 if size == "paper" else _SHAPES[size]["n_layers"]
    data = layout(size, pattern="NNNNFNNN", n_layers=n_layers).model_dump(mode="json")
    for i, layer in enumerate(data["layers"]):
        if layer["mixer"]["type"] == "mamba":
            layer["mixer"]["inner_norm_eps"] = 1e-6
        else:
            layer["mixer"].update(qkv_bias=False, rope={"kind": "none"})
        if i % 2 == 1:
            layer["mlp"] = _experts(size, layer["mlp"]["hidden"], published=16, normalize_top_k=False)  # as wide as the MLP
    return LayoutSpec.model_validate(data)


_pattern_recipe("lfm2", "CCFCCFCCFCFCFCFC", "LFM2-1.2B (Liquid AI 2025, config.json layer_types): 10 gated short "
                "conv and 6 GQA attention layers in its published order, 16 layers (the first 8 at tiny and "
                "small).", published_layers=16)
_pattern_recipe("rwkv7", "W", "RWKV-7 Goose (Peng et al. 2025, arXiv:2503.14456): every layer RWKV-7 time mixing with "
                "64-dim heads at small and paper size (its squared-ReLU channel mixing is the shared SwiGLU here, "
                "and the cross-layer value residual is left out), 24 layers as the 1.5B model.", published_layers=24)
_pattern_recipe("falcon-h1", "H", "Falcon-H1 (TII 2025, arXiv:2507.22448; Falcon-H1-7B config.json): attention and "
                "Mamba2 side by side in every layer, their outputs summed, 44 layers as the 7B model.",
                published_layers=44)
_pattern_recipe("kimi-linear", "KKKD" * 6 + "KKD", "Kimi Linear (Moonshot AI 2025, arXiv:2510.26692; Kimi-Linear-48B-A3B "
                "config.json full_attn_layers [4, 8, ..., 24, 27]): 3 KDA layers to 1 NoPE MLA layer, the last layer "
                "MLA, 27 layers (its MoE MLPs await the experts channel mixer).", published_layers=27)
