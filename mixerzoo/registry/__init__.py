"""Lookup by name: mixer types (built-in and plugins) and recipes (spec factories)."""

from mixerzoo.mixers.registry import build_mixer, list_mixers, mixer_class, mixer_config, register_mixer
from mixerzoo.registry.recipes import SIZES, list_recipes, recipe, register_recipe

__all__ = [
    "SIZES", "build_mixer", "list_mixers", "list_recipes", "mixer_class", "mixer_config", "recipe", "register_mixer",
    "register_recipe",
]
