"""The config reference: every config model's fields (type, default, meaning), read from the pydantic models.

`mixerzoo mixers` prints it (plugins included); docs/CONFIG.md is the same text for the
built-in mixers (`python -m mixerzoo.reference > docs/CONFIG.md`, kept current by a test). It reads every layer's
config models, so it sits at the top of the package, beside the CLI.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mixerzoo.mixers.registry import PLUGIN_GROUP, list_mixers, mixer_class



def type_name(annotation: typing.Any) -> str:
    """A field's type as a reader writes it in YAML: int, float | null, swiglu | none, list[int], ..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return " | ".join(str(m.value) for m in annotation)
        return {Path: "path", type(None): "null"}.get(annotation, annotation.__name__)
    return str(annotation).replace("typing.", "")


def default_text(field) -> str:
    """A field's default as YAML would spell it; `required` when it has none."""
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        value = value.value
    return json.dumps(value, default=str)


def model_table(model: type[BaseModel]) -> str:
    """A markdown table of `model`'s fields: key, type, default, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        meaning = (field.description or "").replace("|", "\\|")
        cells = [f"`{name}`", type_name(field.annotation).replace("|", "\\|"), f"`{default_text(field)}`", meaning]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _section(title: str, model: type[BaseModel], note: str = "") -> list[str]:
    doc = " ".join((model.__doc__ or "").split("\n\n")[0].split())
    return [f"### {title}", "", doc + (f" {note}" if note else ""), "", model_table(model), ""]


_LAYOUT_NOTE = ("Instead of `layers`: `n_layers`, `pattern` (letters repeated to n_layers) or `ratio` ({letter: weight}), "
                "`legend` (letter -> mixer), `mlp` and `rope` (shared by every layer) and `overrides` "
                "({layer index: patch}).")


def reference_models(*, plugins: bool = True) -> list[tuple[str, str, type[BaseModel]]]:
    """(part, title, model) of every config model the reference documents, in its order: layouts, mixer
    types (plugins too unless `plugins=False`), experiments and their studies' settings, training."""
    from mixerzoo.ablate.runner import ExperimentConfig
    from mixerzoo.ablate.studies import RunConfig, get_study, list_studies, settings_class
    from mixerzoo.blocks.spec import LayerSpec, LayoutSpec, MLPSpec
    from mixerzoo.mixers.attention import RopeConfig
    from mixerzoo.train.config import DataConfig, LoRAConfig, ModelSource, OptimConfig, TrainConfig

    layouts, mixers = "## Layouts (a LayoutSpec YAML)", "## Mixers (`mixer`, or a legend entry)"
    experiments = "## Experiments (`mixerzoo ablate` YAML)"
    training = "## Training (`mixerzoo distill-layers | distill-logits | sft | long-sft` YAML)"
    out = [(layouts, "LayoutSpec", LayoutSpec), (layouts, "LayerSpec", LayerSpec), (layouts, "MLPSpec (`mlp`)", MLPSpec)]
    for name in list_mixers():
        if plugins or mixer_class(name).__module__.startswith("mixerzoo."):
            out.append((mixers, f"type: {name}", mixer_class(name).config_class))
            if name == "attention":
                out.append((mixers, "RopeConfig (attention's `rope`)", RopeConfig))
    out += [(experiments, "ExperimentConfig", ExperimentConfig), (experiments, "RunConfig (keys of `sweep`)", RunConfig)]
    for study in list_studies():
        if plugins or get_study(study).__module__.startswith("mixerzoo."):
            out.append((experiments, f"study: {study} (its `fixed` / `settings.<key>` keys)", settings_class(study)))
    out += [(training, title, model) for title, model in (
        ("TrainConfig", TrainConfig), ("ModelSource (`student`, `teacher`)", ModelSource),
        ("DataConfig (`data`)", DataConfig), ("OptimConfig (`optim`)", OptimConfig), ("LoRAConfig (`lora`)", LoRAConfig))]
    return out


def config_reference(*, plugins: bool = True) -> str:
    """The reference as markdown: every model of `reference_models`, a table of fields each."""
    out = ["# Config reference", "",
           "Every key of every config, generated from the pydantic models (`mixerzoo mixers` prints the same, "
           "with installed plugin mixers). A misspelt key is an error naming the nearest valid one.", ""]
    part = None
    for heading, title, model in reference_models(plugins=plugins):
        if heading != part:
            out += [heading, ""]
            if heading.startswith("## Mixers"):
                out += [f"A third-party package adds a type through the entry-point group `{PLUGIN_GROUP}`.", ""]
            part = heading
        out += _section(title, model, _LAYOUT_NOTE if title == "LayoutSpec" else "")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference(plugins=False), end="")
