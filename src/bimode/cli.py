"""`bimode <command>`: the recipe's stages from the command line.

Every command is configured the same way (bimode/commands): a dataclass config whose fields are the flags
(`--field_name`), `--config RECIPE.yaml` for any of them, `--help` generated from the fields' help.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bimode.commands import COMMANDS, find_command


def overview_parser() -> argparse.ArgumentParser:
    """`bimode --help`: the commands, each with its one-line help (each command parses its own flags)."""
    parser = argparse.ArgumentParser(prog="bimode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, list[str]] = {}
    for words, (_, text) in COMMANDS.items():
        groups.setdefault(words[0], []).append(text if len(words) == 1 else f"{words[1]}: {text}")
    for name, texts in groups.items():
        sub.add_parser(name, help="; ".join(texts), add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bimode.errors import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    words, rest = find_command(argv)
    if words is None:
        parser = overview_parser()
        if argv[:1] in (["-h"], ["--help"]) or not argv:
            parser.print_help()
            return 0 if argv else 2
        group = [w[1] for w in COMMANDS if w[0] == argv[0] and len(w) > 1]
        if group:  # `bimode data` without synth / convert
            parser.exit(2, f"bimode {argv[0]}: give one of {', '.join(group)} (bimode {argv[0]} {group[0]} --help)\n")
        parser.error(f"unknown command {argv[0]!r}; `bimode --help` lists them")
    module = importlib.import_module(f"bimode.commands.{COMMANDS[words][0]}")
    try:
        configs = module.make_parser(prog="bimode " + " ".join(words)).parse_args_and_config(rest)
        return module.main(*configs)
    except UsageError as exc:  # the user's mistake: one line; anything else is a bug and keeps its traceback
        if os.environ.get("BIMODE_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
