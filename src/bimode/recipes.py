"""The recipes and launch configs bimode ships, and the one way they are read.

They live inside the package (bimode/configs/recipes, bimode/configs/accelerate; the repository's `configs/`
links there), so a wheel install has them too, found with importlib.resources as TRL finds its launch
configs. Every reader goes through TrlParser's `--config` path: the CLI, the demo and the scripts alike, so a
recipe's `env` block and its values mean the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
from importlib.resources import files
from pathlib import Path

import yaml
from trl import TrlParser

from bimode.errors import MissingInputError, UsageError

# the package's own folder: importlib.resources gives a real directory for every install pip makes
CONFIGS = Path(str(files("bimode").joinpath("configs")))
RECIPES = CONFIGS / "recipes"
LAUNCH_CONFIGS = CONFIGS / "accelerate"


def _shipped(folder: Path, name: str | Path, what: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    named = folder / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if named.is_file():
        return named
    shipped = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise MissingInputError(f"no {what} {str(name)!r}: neither a file nor one bimode ships ({shipped})")


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file: a path, or the name of one bimode ships (`tiny_bpo` or `tiny_bpo.yaml`)."""
    return _shipped(RECIPES, recipe, "recipe")


def launch_config_path(config: str | Path) -> Path:
    """An accelerate launch config: a path, or the name of one bimode ships (`zero2`, `cpu2_fsdp2`, ...)."""
    return _shipped(LAUNCH_CONFIGS, config, "launch config")


def recipe_values(recipe: str | Path) -> dict:
    """A recipe's field: value mapping, as written (its `env` block left out)."""
    path = recipe_path(recipe)
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a recipe is a YAML mapping of field: value")
    if not isinstance(values.get("env", {}), dict):
        raise UsageError(f"{path}: env is a mapping of variable: value")
    values.pop("env", None)
    return values


class RecipeParser(TrlParser):
    """TrlParser whose `--config` also takes a shipped recipe's name, and whose `overrides` (field: value)
    win over the recipe's values, as flags do."""

    def __init__(self, dataclass_types, overrides: dict | None = None, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.overrides = dict(overrides or {})

    def parse_args_and_config(self, args=None, **kwargs):
        args = list(args or [])
        if "--config" in args[:-1]:
            at = args.index("--config") + 1
            args[at] = str(recipe_path(args[at]))
            self._check_fields(Path(args[at]), recipe_values(args[at]))
        self._check_fields(None, self.overrides)
        return super().parse_args_and_config(args, **kwargs)

    def _check_fields(self, path: Path | None, values: dict) -> None:
        known = {f.name for t in self.dataclass_types for f in dataclasses.fields(t) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            names = " or ".join(t.__name__ for t in self.dataclass_types)
            raise UsageError(f"{path or 'overrides'}: {names} has no field {', '.join(unknown)}")

    def set_defaults_with_config(self, **config) -> list[str]:
        return super().set_defaults_with_config(**{**config, **self.overrides})


def load_recipe(config_class, recipe: str | Path, **overrides):
    """`config_class` from a YAML recipe with some fields overridden, read exactly as `--config RECIPE` is:
    the demo and scripts run the committed recipes this way instead of restating their values. A tuple of
    classes (a training command's config and TRL's ModelConfig) gives a tuple of instances."""
    classes = tuple(config_class) if isinstance(config_class, (tuple, list)) else (config_class,)
    parser = RecipeParser(classes, overrides=overrides)
    configs = parser.parse_args_and_config(["--config", str(recipe_path(recipe))])
    return tuple(configs[:len(classes)]) if isinstance(config_class, (tuple, list)) else configs[0]
