"""`bimode data convert`: LLaVA / ShareGPT / QA files into bimode records."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.data.convert import INPUT_FORMATS
from bimode.errors import UsageError

HELP = help_text("data", "convert")


@dataclass
class ConvertConfig:
    input: str = field(default="", metadata={"help": "JSON or JSONL file"})
    out: str = field(default="", metadata={"help": "output .jsonl / .parquet / directory"})
    format: str = field(default="auto", metadata={"help": f"input layout: {' | '.join(INPUT_FORMATS)}"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})

    def __post_init__(self):
        if not self.input or not self.out:
            raise UsageError("--input and --out are required")
        if self.format not in INPUT_FORMATS:
            raise UsageError(f"format must be one of {', '.join(INPUT_FORMATS)}, not {self.format!r}")


def make_parser(prog: str = "bimode data convert") -> CommandParser:
    return CommandParser((ConvertConfig,), prog=prog, description=HELP)


def main(cfg: ConvertConfig) -> int:
    from bimode.data.convert import convert_file

    n = convert_file(cfg.input, cfg.out, cfg.format, overwrite=cfg.overwrite)
    print(f"{n} records written to {cfg.out}")
    return 0
