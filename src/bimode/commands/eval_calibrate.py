"""`bimode eval calibrate RUN`: auto mode's think threshold from an eval run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands.parsing import CommandParser
from bimode.errors import MissingInputError, UsageError

DESCRIPTION = ("Pick auto mode's think_threshold from an eval run's p_think and think / no_think outcomes (greedy: no "
        "generation), on part of its questions, and report it on the rest (or on a second run). Writes "
        "calibration.json and calibration.md to the run directory.")


@dataclass
class CalibrateConfig:
    run: str = field(default="", metadata={"help": "eval run directory (samples.jsonl with think and no_think rows)"})
    max_drop: float | None = field(default=None, metadata={
        "help": "accuracy points auto may lose against think mode: the fewest tokens within it"})
    token_share: float | None = field(default=None, metadata={
        "help": "share of think mode's mean tokens auto may use (0.5 = half): the best accuracy within it"})
    holdout_fraction: float | None = field(default=None, metadata={
        "help": "share of the run's questions held out to report on, never used to pick (default 0.5; not with "
                "--holdout)"})
    holdout: str | None = field(default=None, metadata={
        "help": "a second eval run of other questions to report on; then all of RUN picks"})
    confidence: float = field(default=0.95, metadata={
        "help": "a threshold meets the goal only at this one-sided confidence (paired bootstrap over the "
                "picking questions), so that it holds on new questions; 0: the measured pick, no margin"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split and of the bootstrap"})

    def __post_init__(self):
        if not self.run:
            raise UsageError("bimode eval calibrate needs RUN, an eval run directory")
        if (self.max_drop is None) == (self.token_share is None):
            raise UsageError("give one goal: --max_drop POINTS or --token_share SHARE")
        if self.holdout and self.holdout_fraction is not None:
            raise UsageError("--holdout_fraction splits RUN; with --holdout RUN2 all of RUN picks: give one of the two")
        if self.holdout_fraction is None:
            self.holdout_fraction = 0.5
        if not 0 <= self.confidence < 1:
            raise UsageError(f"--confidence must be in [0, 1), got {self.confidence}")


def make_parser(prog: str = "bimode eval calibrate") -> CommandParser:
    return CommandParser((CalibrateConfig,), prog=prog, description=DESCRIPTION, positional={"run": "?"})


def main(cfg: CalibrateConfig) -> int:
    from bimode.eval.calibrate import calibrate, render_calibration
    from bimode.eval.runner import read_samples
    from bimode.io import atomic_write_text

    run = Path(cfg.run)
    for folder in (run, Path(cfg.holdout) if cfg.holdout else None):
        if folder is not None and not (folder / "samples.jsonl").is_file():
            raise MissingInputError(f"no samples.jsonl in {folder}: give the directory of a `bimode eval` run")
    rows = read_samples(run / "samples.jsonl")
    holdout = read_samples(Path(cfg.holdout) / "samples.jsonl") if cfg.holdout else None
    result = calibrate(rows, max_drop=cfg.max_drop, token_share=cfg.token_share,
                       holdout_fraction=cfg.holdout_fraction, seed=cfg.seed, holdout_rows=holdout,
                       confidence=cfg.confidence)
    text = render_calibration(result, str(run))
    atomic_write_text(run / "calibration.json", json.dumps(result, indent=2))
    atomic_write_text(run / "calibration.md", text)
    print(text, end="")
    return 0
