"""The mixer table: type name -> Mixer class, for built-in and plugin mixers."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Mapping

from mixerzoo.errors import close_matches
from mixerzoo.mixers.base import Mixer, MixerConfig

PLUGIN_GROUP = "mixerzoo.mixers"  # entry-point group through which installed packages add mixers
_MIXERS: dict[str, type[Mixer]] = {}
_plugins_loaded = False


def load_plugins() -> None:
    """Register the Mixer classes that installed packages declare in the `mixerzoo.mixers` entry-point group."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=PLUGIN_GROUP):
        cls = entry.load()
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"entry point {entry.name!r} in {PLUGIN_GROUP!r} must name a Mixer subclass, got {cls!r}")
        register_mixer(cls)


def register_mixer(cls: type[Mixer]) -> type[Mixer]:
    """Register a Mixer subclass under its config's `type` name (usable as a decorator)."""
    name = cls.config_class.model_fields["type"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.config_class.__name__}.type needs a default name, e.g. type: Literal['mine'] = 'mine'")
    if name in _MIXERS and _MIXERS[name] is not cls:
        raise ValueError(f"mixer type {name!r} is already registered by {_MIXERS[name].__qualname__}")
    _MIXERS[name] = cls
    return cls


def list_mixers() -> list[str]:
    """Registered mixer type names (plugins included)."""
    load_plugins()
    return sorted(_MIXERS)


def mixer_class(name: str) -> type[Mixer]:
    """The Mixer class registered as `name`."""
    load_plugins()
    if name not in _MIXERS:
        raise KeyError(f"unknown mixer type {name!r}{close_matches(str(name), set(_MIXERS))}; registered: {list_mixers()}")
    return _MIXERS[name]


def mixer_config(spec: Mapping[str, Any] | MixerConfig | str) -> MixerConfig | type[MixerConfig]:
    """A validated config from a dict with a `type` key (a config is returned as is); given a type
    name, that mixer's config class: its schema (`.model_fields`, `.model_json_schema()`)."""
    if isinstance(spec, MixerConfig):
        return spec
    if isinstance(spec, str):
        return mixer_class(spec).config_class
    if not isinstance(spec, Mapping):
        raise TypeError(f"a mixer spec is a mapping with a 'type' key, a config or a type name, got {type(spec).__name__}")
    if "type" not in spec:
        raise ValueError(f"a mixer spec needs a 'type' (one of {list_mixers()}), got keys {sorted(spec)}")
    return mixer_class(spec["type"]).config_class.model_validate(dict(spec))


def build_mixer(spec: Mapping[str, Any] | MixerConfig) -> Mixer:
    """The mixer module for a spec dict or config."""
    config = mixer_config(spec)
    return mixer_class(config.type)(config)
