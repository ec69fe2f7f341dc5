"""LayoutSpec: a decoder as d_model, vocab, and a list of layers (mixer + MLP), in YAML or JSON.

Layers are written out, or given as a `pattern` of letters with a `legend` (Megatron-style,
repeated to n_layers), or as a `ratio` of legend letters spread evenly over n_layers;
`overrides` patch single layers. Validation expands every form into `layers`, so a
validated spec always holds the explicit list, and dumps round-trip to an equal spec.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator
from typing_extensions import Self

from mixerzoo.errors import StrictModel, describe_validation_error
from mixerzoo.mixers import MixerConfig, RopeConfig, mixer_class, mixer_config


_EXPERT_FIELDS = ("n_experts", "top_k", "normalize_top_k", "shared_hidden", "shared_gate")


class MLPSpec(StrictModel):
    """The channel mixer after each token mixer: SwiGLU, experts (top-k routed SwiGLUs), or none."""

    type: Literal["swiglu", "experts", "none"] = Field("swiglu",
        description="swiglu (gate, up, down projections), experts (top-k routed SwiGLU experts) or none (no MLP)")
    hidden: int | None = Field(None, gt=0, description="SwiGLU inner width (each expert's, for experts)")
    bias: bool = Field(False, description="bias on the MLP projections (swiglu only)")
    activation: Literal["silu", "gelu_tanh"] = Field("silu", description="the gate's activation: silu (SwiGLU) or "
                                                     "tanh-approximated gelu (GeGLU: Gemma, RecurrentGemma)")
    n_experts: int | None = Field(None, gt=0, description="experts: number of routed experts")
    top_k: int | None = Field(None, gt=0, description="experts: experts per token")
    normalize_top_k: bool = Field(True, description="experts: renormalise the k router probabilities to sum to 1 "
                                                     "(Qwen's norm_topk_prob, Mixtral's form); false keeps them (Jamba)")
    shared_hidden: int | None = Field(None, gt=0, description="experts: inner width of a shared SwiGLU expert every "
                                                              "token sees (none when unset)")
    shared_gate: bool = Field(False, description="experts: scale the shared expert by sigmoid(w . x) (Qwen3-Next)")

    omitted_when_default: ClassVar[tuple[str, ...]] = (*_EXPERT_FIELDS, "activation")

    @model_validator(mode="after")
    def _fields_match_type(self) -> Self:
        if self.type != "none" and self.hidden is None:
            raise ValueError(f"mlp.hidden is required for a {self.type} MLP")
        if self.type == "none" and self.hidden is not None:
            raise ValueError("mlp.hidden must be unset for type 'none'")
        expert_fields = {"n_experts": self.n_experts, "top_k": self.top_k, "shared_hidden": self.shared_hidden}
        if self.type == "experts":
            for name in ("n_experts", "top_k"):
                if expert_fields[name] is None:
                    raise ValueError(f"mlp.{name} is required for an experts MLP")
            if self.top_k > self.n_experts:
                raise ValueError(f"mlp.top_k = {self.top_k} is more than mlp.n_experts = {self.n_experts}")
            if self.shared_gate and self.shared_hidden is None:
                raise ValueError("mlp.shared_gate needs a shared expert (set mlp.shared_hidden)")
            if self.bias or self.activation != "silu":
                raise ValueError("mlp.bias / mlp.activation: experts are bias-free SwiGLUs")
        else:
            given = [name for name, value in expert_fields.items() if value is not None] + (["shared_gate"] if self.shared_gate else [])
            if given:
                raise ValueError(f"mlp.{given[0]} is an experts field; the MLP type is {self.type!r}")
        return self


class LayerSpec(StrictModel):
    """One decoder layer: a token mixer (any registered type) and an MLP, each after its RMSNorm and added to
    the residual stream (pre-norm), or as MiniMax-01 writes its layers."""

    mixer: SerializeAsAny[MixerConfig] = Field(
        description="the token mixer: a mapping with a registered `type` and that type's fields")
    mlp: MLPSpec = Field(description="the channel mixer after it")
    residual: Literal["stream", "normed"] = Field("stream", description="what each sublayer's output is added to: "
        "the residual stream (pre-norm) or its own normed input, which then replaces the stream (MiniMax-01)")
    mixer_scales: tuple[float, float] = Field((1.0, 1.0), description="(alpha, beta): the layer adds "
        "alpha * residual + beta * mixer output (MiniMax's attn_alpha_factor / attn_beta_factor)")
    mlp_scales: tuple[float, float] = Field((1.0, 1.0), description="(alpha, beta) of the MLP's residual sum")

    omitted_when_default: ClassVar[tuple[str, ...]] = ("residual", "mixer_scales", "mlp_scales")

    @field_validator("mixer", mode="before")
    @classmethod
    def _resolve_type(cls, value: Any) -> MixerConfig:
        return mixer_config(value) if isinstance(value, dict) else value


def _deep_merge(base: dict, patch: dict) -> dict:
    merged = dict(base)
    for key, value in patch.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _ratio_letters(ratio: dict[str, int], n_layers: int) -> str:
    """Letters spread over n_layers in proportion to `ratio`; the most frequent letter fills the gaps."""
    total = sum(ratio.values())
    majority = max(ratio, key=ratio.get)
    letters: list[str | None] = [None] * n_layers
    for letter, weight in ratio.items():
        if letter == majority:
            continue
        count = round(n_layers * weight / total)
        free = [i for i, slot in enumerate(letters) if slot is None]
        for k in range(count):  # evenly spaced, first slot at the start of each span
            letters[free[(k * len(free)) // count]] = letter
    return "".join(slot or majority for slot in letters)


# Beyond these no machine holds the model (checked on the raw spec, before any layer is built).
MAX_LAYERS = 4096
MAX_WIDTH = 2**17
MAX_VOCAB = 2**24
MAX_PARAMETERS = 10**13  # 20 TB in bfloat16


def _check_bounds(data: dict) -> None:
    """Refuse sizes no machine can hold, from the raw spec: depth, width, vocabulary, and a rough
    parameter count (16 d^2 per layer, embeddings and head)."""
    def positive_int(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    n_layers = positive_int(data.get("n_layers"))
    if n_layers is None and isinstance(data.get("layers"), list):
        n_layers = len(data["layers"])
    d_model, vocab = positive_int(data.get("d_model")), positive_int(data.get("vocab_size"))
    for key, value, limit in (("n_layers", n_layers, MAX_LAYERS), ("d_model", d_model, MAX_WIDTH),
                              ("vocab_size", vocab, MAX_VOCAB)):
        if value is not None and value > limit:
            raise ValueError(f"{key} = {value:,} is more than any machine holds (at most {limit:,})")
    if n_layers and d_model and vocab and 16 * d_model**2 * n_layers + 2 * vocab * d_model > MAX_PARAMETERS:
        raise ValueError(f"{n_layers:,} layers of width {d_model:,} with a {vocab:,}-token vocabulary come to more "
                         f"than {MAX_PARAMETERS:.0e} parameters: more than any machine holds")


_SHORTHAND = ("n_layers", "pattern", "ratio", "legend", "mlp", "rope", "overrides")  # expanded into `layers`


def _where(index: int, letter: str | None) -> str:
    return f"layer {index}" + (f" (pattern letter {letter!r})" if letter else "")


class LayoutSpec(StrictModel):
    """A decoder language model: embeddings, layers (mixer + MLP, pre-norm residual), final norm, LM head."""

    d_model: int = Field(gt=0, description="width of the residual stream")
    vocab_size: int = Field(gt=0, description="token vocabulary (embedding rows, logits)")
    layers: list[LayerSpec] = Field(
        description="the layers in order (or give n_layers, pattern / ratio, legend, mlp, rope and overrides)")
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of the pre-norms and the final RMSNorm")
    tie_embeddings: bool = Field(True, description="the LM head shares the embedding matrix")
    embed_scale: float = Field(1.0, gt=0, description="token embeddings are multiplied by this (Gemma: sqrt(d_model))")
    logit_softcap: float | None = Field(None, gt=0, description="logits become cap * tanh(logits / cap) (Gemma 2, "
                                                                 "RecurrentGemma); none when unset")

    omitted_when_default: ClassVar[tuple[str, ...]] = ("embed_scale", "logit_softcap")

    @classmethod
    def known_keys(cls) -> set[str]:
        """The spec's fields and the shorthand that expands into `layers` (pattern, ratio, legend, ...)."""
        return super().known_keys() | set(_SHORTHAND)

    @model_validator(mode="before")
    @classmethod
    def _expand_layers(cls, data: Any) -> Any:
        """Turn pattern / ratio + legend (+ overrides) into an explicit layer list."""
        if not isinstance(data, dict):
            return data
        cls.check_keys(data)
        _check_bounds(data)
        data = dict(data)
        n_layers = data.get("n_layers")
        if n_layers is not None and (not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1):
            raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
        shorthand = {key: data.pop(key) for key in _SHORTHAND if key in data}
        if "layers" in data:
            if {"pattern", "ratio", "legend"} & shorthand.keys():
                raise ValueError("give either layers or pattern/ratio + legend, not both")
            raw_layers = [dict(layer) for layer in data["layers"]]
            letters = [None] * len(raw_layers)
        else:
            raw_layers, letters = cls._layers_from_pattern(data, shorthand)
        if "n_layers" in shorthand and shorthand["n_layers"] != len(raw_layers):
            raise ValueError(f"n_layers is {shorthand['n_layers']} but {len(raw_layers)} layers are given")
        for index, patch in (shorthand.get("overrides") or {}).items():
            if not 0 <= int(index) < len(raw_layers):
                raise ValueError(f"overrides: layer {index} does not exist (the spec has {len(raw_layers)} layers)")
            raw_layers[int(index)] = _deep_merge(raw_layers[int(index)], patch)
        layers = []
        for i, (raw, letter) in enumerate(zip(raw_layers, letters)):
            raw.setdefault("mlp", shorthand.get("mlp", {"type": "none"}))
            mixer = dict(raw.get("mixer") or {})
            mixer.setdefault("d_model", data.get("d_model"))
            try:
                if "rope" in shorthand and "type" in mixer and "rope" in mixer_class(mixer["type"]).config_class.model_fields:
                    mixer.setdefault("rope", shorthand["rope"])
                layers.append(LayerSpec.model_validate({**raw, "mixer": mixer}))
            except ValidationError as error:
                raise ValueError(f"{_where(i, letter)}: {describe_validation_error(error)}") from None
            except (KeyError, ValueError) as error:
                raise ValueError(f"{_where(i, letter)}: {error}") from None
        data["layers"] = layers
        return data

    @staticmethod
    def _layers_from_pattern(data: dict, shorthand: dict) -> tuple[list[dict], list[str]]:
        legend = shorthand.get("legend")
        if not legend:
            raise ValueError("a spec needs layers, or a pattern / ratio with a legend")
        if ("pattern" in shorthand) == ("ratio" in shorthand):
            raise ValueError("give exactly one of pattern and ratio")
        if "ratio" in shorthand:
            if "n_layers" not in shorthand:
                raise ValueError("a ratio needs n_layers")
            ratio = shorthand["ratio"]
            if not ratio or any(not isinstance(w, int) or w < 0 for w in ratio.values()):
                raise ValueError(f"ratio weights must be non-negative integers, got {ratio}")
            letters = _ratio_letters(ratio, shorthand["n_layers"])
        else:
            pattern = shorthand["pattern"]
            if not pattern:
                raise ValueError("pattern is empty")
            n_layers = shorthand.get("n_layers", len(pattern))
            if n_layers % len(pattern) and len(pattern) != n_layers:
                raise ValueError(f"pattern {pattern!r} ({len(pattern)} letters) does not tile n_layers = {n_layers}")
            letters = (pattern * (n_layers // len(pattern)))[:n_layers]
        missing = sorted(set(letters) - set(legend))
        if missing:
            raise ValueError(f"pattern letters {missing} are missing from the legend (it has {sorted(legend)})")
        return [{"mixer": dict(legend[letter])} for letter in letters], list(letters)

    @property
    def n_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    def to_yaml(self) -> str:
        """The spec as YAML (explicit layers); `LayoutSpec.from_yaml` reads it back equal."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "LayoutSpec":
        """A validated spec from YAML text (safe_load)."""
        return cls.model_validate(yaml.safe_load(text))

    def to_json(self) -> str:
        """The spec as canonical JSON (sorted keys)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LayoutSpec":
        """A validated spec from JSON text."""
        return cls.model_validate_json(text)


__all__ = ["LayerSpec", "LayoutSpec", "MLPSpec", "RopeConfig"]
