"""Recipes: named spec factories, each at sizes tiny (tests), small (CPU experiments) and paper.

Every recipe shares one size table (width, depth, heads, MLP, vocab) and differs only in
its layer pattern, so an ablation changes exactly one thing: the token mixers. At paper
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
# F full attention, S sliding-window attention, G Gated DeltaNet, M Mamba2.
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
    },
    "small": {
        "F": dict(type="attention", n_heads=8, n_kv_heads=2, head_dim=64, qkv_bias=True),
        "S": dict(type="attention", n_heads=8, n_kv_heads=2, head_dim=64, qkv_bias=True, window=512),
        "G": dict(type="gated_deltanet", n_heads=4, head_dim=64, expand_v=2),
        "M": dict(type="mamba2", d_state=64, head_dim=64, expand=2, chunk_size=64),
    },
    "paper": {
        "F": dict(type="attention", n_heads=16, n_kv_heads=2, head_dim=128, qkv_bias=True,
                  rope=dict(kind="mrope", sections=[16, 24, 24], theta=1e6)),
        "S": dict(type="attention", n_heads=16, n_kv_heads=2, head_dim=128, qkv_bias=True, window=8192,
                  rope=dict(kind="mrope", sections=[16, 24, 24], theta=1e6)),
        "G": dict(type="gated_deltanet", n_heads=16, head_dim=128, expand_v=2, conv_size=4),
        "M": dict(type="mamba2", d_state=128, head_dim=64, expand=2, chunk_size=256),
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


def layout(size: str, *, pattern: str | None = None, ratio: dict[str, int] | None = None) -> LayoutSpec:
    """A spec at `size` from a pattern (or ratio) over the shared legend F / S / G / M."""
    shape = _SHAPES[size]
    legend = {letter: spec for letter, spec in _LEGENDS[size].items() if letter in (pattern or "".join(ratio or {}))}
    data = dict(
        d_model=shape["d_model"], vocab_size=shape["vocab_size"], n_layers=shape["n_layers"], legend=legend,
        mlp=dict(type="swiglu", hidden=shape["mlp_hidden"]), norm_eps=1e-6, tie_embeddings=size == "paper",
    )
    data.update(pattern=pattern) if pattern else data.update(ratio=ratio)
    return LayoutSpec.model_validate(data)


def _pattern_recipe(name: str, pattern: str, doc: str) -> None:
    def factory(size: str) -> LayoutSpec:
        return layout(size, pattern=pattern)

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
