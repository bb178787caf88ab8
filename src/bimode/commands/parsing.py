"""One way to configure every command: dataclass configs, parsed from a YAML recipe plus flags.

This is TRL's convention (`TrlParser`, itself transformers' `HfArgumentParser`): each field of a command's
config dataclass is a flag (`--field_name`; `--field-name` is accepted too), its `metadata["help"]` is the
`--help` text, `--config RECIPE.yaml` sets any field (flags given beside it win), and `__post_init__`
validates. `bimode anneal` / `bimode bpo` parse TRL's own configs the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml
from trl import TrlParser

# configs/recipes of the repository this package was installed from (`pip install -e .`)
RECIPES = Path(__file__).resolve().parents[3] / "configs" / "recipes"


class CommandParser(TrlParser):
    """TrlParser plus positional arguments for fields a user names first (`bimode chat MODEL`, as `vllm serve
    MODEL`): `positional` maps a field to its argparse nargs; the `--field` flag stays too."""

    def __init__(self, dataclass_types, prog: str, description: str | None = None,
                 positional: dict[str, str] | None = None):
        super().__init__(dataclass_types, prog=prog, description=description)
        helps = {f.name: f.metadata.get("help") for t in self.dataclass_types for f in dataclasses.fields(t)}
        for name, nargs in (positional or {}).items():
            # SUPPRESS: when the positional is absent, the flag's (or the recipe's) value stands
            self.add_argument(name, nargs=nargs, default=argparse.SUPPRESS, metavar=name.upper(),
                              help=f"{helps[name]} (or --{name})")


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file: a path, or the name of one in configs/recipes (`tiny_bpo` or `tiny_bpo.yaml`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if named.is_file():
        return named
    raise FileNotFoundError(f"no recipe {recipe!r}: neither a file nor one of {RECIPES} "
                            "(the recipes ship with the repository: install bimode from a clone, pip install -e .)")


def recipe_values(recipe: str | Path) -> dict:
    """A recipe's field: value mapping, as written (its `env` block left out)."""
    path = recipe_path(recipe)
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of field: value")
    values.pop("env", None)
    return values


def load_recipe(config_class, recipe: str | Path, **overrides):
    """`config_class` from a YAML recipe with some fields overridden: the demo and scripts run the committed
    recipes this way instead of restating their values."""
    path = recipe_path(recipe)
    values = {**recipe_values(path), **overrides}
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: {config_class.__name__} has no field {', '.join(unknown)}")
    return config_class(**values)

