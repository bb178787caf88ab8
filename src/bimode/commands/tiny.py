"""`bimode tiny`: build the embedded tiny VLM (SigLIP + Qwen3, LLaVA layout) offline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import OutputExistsError, UsageError

HELP = help_text("tiny")


@dataclass
class TinyCommandConfig:
    out: str = field(default="", metadata={"help": "directory to write the model and processor to"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output directory"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required: the directory to write the tiny model to")


def make_parser(prog: str = "bimode tiny") -> CommandParser:
    return CommandParser((TinyCommandConfig,), prog=prog, description=HELP)


def main(cfg: TinyCommandConfig) -> int:
    from bimode.models.card import CardFacts
    from bimode.models.card_files import write_card
    from bimode.models.tiny import TinyConfig, build_tiny

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OutputExistsError(f"{out} is not empty; pass --overwrite to replace it")
    build_tiny(out, TinyConfig(seed=cfg.seed))
    write_card(out, CardFacts(stage="tiny", settings={"seed": cfg.seed}))
    print(f"tiny model written to {out}")
    return 0
