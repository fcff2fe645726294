"""Recipes: TOML files that describe a training run, validated against a typed schema."""

from accelengine.recipe.components import BUILTINS, ComponentSpec, instantiate, resolve
from accelengine.recipe.schema import CheckpointSection, DataSection, LoaderSection, Recipe, TrainerSection
from accelengine.recipe.toml_io import apply_overrides, dump_toml, load_toml, parse_toml
from accelengine.recipe.validate import load_recipe, recipe_to_dict, validate

__all__ = [
    "BUILTINS",
    "CheckpointSection",
    "ComponentSpec",
    "DataSection",
    "LoaderSection",
    "Recipe",
    "TrainerSection",
    "apply_overrides",
    "dump_toml",
    "instantiate",
    "load_recipe",
    "load_toml",
    "parse_toml",
    "recipe_to_dict",
    "resolve",
    "validate",
]
