"""Name -> mixer lookup: every mixer type a spec can name, built-in or plugin."""

from __future__ import annotations

from typing import Any, Mapping

from mixerzoo.mixers import Attention, Mixer, MixerConfig

_MIXERS: dict[str, type[Mixer]] = {}


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
    """Registered mixer type names."""
    return sorted(_MIXERS)


def mixer_class(name: str) -> type[Mixer]:
    """The Mixer class registered as `name`."""
    if name not in _MIXERS:
        raise KeyError(f"unknown mixer type {name!r}; registered: {list_mixers()}")
    return _MIXERS[name]


def mixer_config(spec: Mapping[str, Any] | MixerConfig) -> MixerConfig:
    """A validated config from a dict with a `type` key (or a config, returned as is)."""
    if isinstance(spec, MixerConfig):
        return spec
    if "type" not in spec:
        raise ValueError(f"a mixer spec needs a 'type' (one of {list_mixers()}), got keys {sorted(spec)}")
    return mixer_class(spec["type"]).config_class.model_validate(dict(spec))


def build_mixer(spec: Mapping[str, Any] | MixerConfig) -> Mixer:
    """The mixer module for a spec dict or config."""
    config = mixer_config(spec)
    return mixer_class(config.type)(config)


register_mixer(Attention)

__all__ = ["build_mixer", "list_mixers", "mixer_class", "mixer_config", "register_mixer"]
