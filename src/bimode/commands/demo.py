"""`bimode demo [--quick]`: the R-4B recipe on the embedded default, stage by stage."""

from __future__ import annotations

import argparse

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.recipes import recipe_path
from bimode.demo import DemoConfig
from bimode.errors import UsageError

HELP = help_text("demo")


class DemoParser(CommandParser):
    """The demo always runs a recipe: the shipped recipe demo, demo_quick with --quick, or --config's."""

    def __init__(self, prog: str):
        super().__init__((DemoConfig,), prog=prog,
                         description=HELP + " (recipe: demo, or demo_quick with --quick; its stages run the "
                                                   "recipes tiny_*; `bimode configs` lists them)")
        self.add_argument("--quick", action="store_true", default=argparse.SUPPRESS,
                          help="a smaller, faster run (for tests): the recipe demo_quick.yaml")

    def parse_args_and_config(self, args=None, **kwargs):
        args = list(args or [])
        quick = "--quick" in args
        if quick:
            args.remove("--quick")
        if "--config" not in args:
            args += ["--config", str(recipe_path("demo_quick" if quick else "demo"))]
        elif quick:
            raise UsageError("--quick runs the recipe demo_quick.yaml: give --quick or --config, not both")
        return super().parse_args_and_config(args, **kwargs)


def make_parser(prog: str = "bimode demo") -> DemoParser:
    return DemoParser(prog)


def main(cfg: DemoConfig) -> int:
    from bimode.demo import run_demo

    return run_demo(cfg)
