"""`bimode curate merge SHARD_DIR ... --out DIR`: the shard folders of a `--num_shards` curation as one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError

HELP = help_text("curate", "merge")


@dataclass
class CurateMergeConfig:
    shards: list[str] = field(default_factory=list, metadata={
        "help": "the --out folders of every shard of one `bimode curate --num_shards K` run"})
    out: str = field(default="", metadata={"help": "output directory: curated.jsonl, rejects.jsonl, summary.*"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished curation in --out"})

    def __post_init__(self):
        if not self.shards or not self.out:
            raise UsageError("bimode curate merge SHARD_DIR [SHARD_DIR ...] --out DIR")


def make_parser(prog: str = "bimode curate merge") -> CommandParser:
    return CommandParser((CurateMergeConfig,), prog=prog, positional={"shards": "*"},
                         description=HELP + ": the same files one process writes, rows in the same order; a shard "
                         "missing, given twice, of another run or unfinished is refused by name.")


def main(cfg: CurateMergeConfig) -> int:
    from bimode.curate.pipeline import merge_curation

    summary = merge_curation(cfg.shards, Path(cfg.out), overwrite=cfg.overwrite)
    total = summary["total"]
    print(f"merged {len(cfg.shards)} shards: curated {total['curated']} ({total['think']} thinking, "
          f"{total['no_think']} non-thinking), rejected {total['rejected']}; see {Path(cfg.out) / 'summary.md'}")
    return 0
