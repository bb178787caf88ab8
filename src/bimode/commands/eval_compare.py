"""`bimode eval compare A B`: two eval runs side by side (say, before and after BPO)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import MissingInputError, UsageError

HELP = help_text("eval", "compare")


@dataclass
class CompareConfig:
    runs: list[str] = field(default_factory=list, metadata={"help": "two run directories (each with metrics.json)"})

    def __post_init__(self):
        if len(self.runs) != 2:
            raise UsageError(f"bimode eval compare takes two run directories, got {len(self.runs)}")


def make_parser(prog: str = "bimode eval compare") -> CommandParser:
    return CommandParser((CompareConfig,), prog=prog, description=HELP, positional={"runs": "*"})


def main(cfg: CompareConfig) -> int:
    from bimode.eval.report import compare_runs

    for run in cfg.runs:
        if not (Path(run) / "metrics.json").is_file():
            raise MissingInputError(f"no metrics.json in {run}: give the directories of two `bimode eval` runs")
    print(compare_runs(Path(cfg.runs[0]), Path(cfg.runs[1])))
    return 0
