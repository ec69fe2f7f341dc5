"""Lookup by name: mixer types (built-in and plugins) and recipes (spec factories)."""

from mixerzoo.mixers.registry import build_mixer, list_mixers, mixer_class, mixer_config, register_mixer

__all__ = ["build_mixer", "list_mixers", "mixer_class", "mixer_config", "register_mixer"]
