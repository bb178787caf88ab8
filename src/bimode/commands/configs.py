"""`bimode configs [NAME]`: the recipes and launch configs bimode ships, and where they are on disk."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import MissingInputError

HELP = help_text("configs")


@dataclass
class ConfigsConfig:
    name: str = field(default="", metadata={"help": "print the path of this recipe or launch config only (for "
                                                    "`accelerate launch --config_file $(bimode configs zero2)`)"})


def make_parser(prog: str = "bimode configs") -> CommandParser:
    return CommandParser((ConfigsConfig,), prog=prog, description=HELP, positional={"name": "?"})


def main(cfg: ConfigsConfig) -> int:
    from bimode.recipes import LAUNCH_CONFIGS, RECIPES, launch_config_path, recipe_path

    if cfg.name:
        for find in (recipe_path, launch_config_path):
            try:
                print(find(cfg.name))
                return 0
            except FileNotFoundError:
                pass
        raise MissingInputError(f"no recipe or launch config {cfg.name!r}: `bimode configs` lists them")
    for title, folder, use in (("recipes", RECIPES, "--config NAME"),
                               ("launch configs", LAUNCH_CONFIGS, "accelerate launch --config_file PATH")):
        print(f"{title} ({use}), in {folder}:")
        for path in sorted(folder.glob("*.yaml")):
            print(f"  {path.stem}")
    return 0
