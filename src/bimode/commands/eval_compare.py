"""`bimode eval compare A B`: two eval runs side by side (say, before and after BPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser

HELP = help_text("eval", "compare")


@dataclass
class CompareConfig:
    runs: list[str] = field(default_factory=list, metadata={"help": "two run directories (each with metrics.json)"})

    def __post_init__(self):
        if len(self.runs) != 2:
            raise ValueError(f"bimode eval compare takes two run directories, got {len(self.runs)}")


def make_parser(prog: str = "bimode eval compare") -> CommandParser:
    return CommandParser((CompareConfig,), prog=prog, description=HELP, positional={"runs": "*"})


def main(cfg: CompareConfig) -> int:
    from bimode.eval.report import compare_runs

    print(compare_runs(Path(cfg.runs[0]), Path(cfg.runs[1])))
    return 0
