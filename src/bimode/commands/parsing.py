"""One way to configure every command: dataclass configs, parsed from a YAML recipe plus flags.

This is TRL's convention (`TrlParser`, itself transformers' `HfArgumentParser`): each field of a command's
config dataclass is a flag (`--field_name`; `--field-name` is accepted too), its `metadata["help"]` is the
`--help` text, `--config RECIPE` (a YAML file, or the name of a recipe bimode ships: bimode/recipes.py) sets
any field (flags given beside it win), and `__post_init__` validates. `bimode anneal` / `bimode bpo` parse
TRL's own configs the same way.
"""

from __future__ import annotations

import argparse
import dataclasses

from bimode.recipes import RecipeParser


class CommandParser(RecipeParser):
    """RecipeParser plus positional arguments for fields a user names first (`bimode chat MODEL`, as `vllm serve
    MODEL`): `positional` maps a field to its argparse nargs; the `--field` flag stays too."""

    def __init__(self, dataclass_types, prog: str, description: str | None = None,
                 positional: dict[str, str] | None = None):
        super().__init__(dataclass_types, prog=prog, description=description)
        helps = {f.name: f.metadata.get("help") for t in self.dataclass_types for f in dataclasses.fields(t)}
        for name, nargs in (positional or {}).items():
            # SUPPRESS: when the positional is absent, the flag's (or the recipe's) value stands
            self.add_argument(name, nargs=nargs, default=argparse.SUPPRESS, metavar=name.upper(),
                              help=f"{helps[name]} (or --{name})")
