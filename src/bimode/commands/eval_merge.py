"""`bimode eval merge SHARD_DIR ... --out DIR`: the shard folders of a `--num_shards` eval as one run, reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError

HELP = help_text("eval", "merge")


@dataclass
class EvalMergeConfig:
    shards: list[str] = field(default_factory=list, metadata={
        "help": "the --out folders of every shard of one `bimode eval --num_shards K` run"})
    out: str = field(default="", metadata={
        "help": "run directory to write (samples.jsonl, rejects.jsonl, metrics.json, report.md, PNGs)"})
    title: str = field(default="", metadata={"help": "report title (default: bimode eval of the shards' model)"})
    overwrite: bool = field(default=False, metadata={"help": "replace samples.jsonl and the report in --out"})

    def __post_init__(self):
        if not self.shards or not self.out:
            raise UsageError("bimode eval merge SHARD_DIR [SHARD_DIR ...] --out DIR")


def make_parser(prog: str = "bimode eval merge") -> CommandParser:
    return CommandParser((EvalMergeConfig,), prog=prog, positional={"shards": "*"},
                         description=HELP + ": the samples of every shard in one run folder, with the report "
                         "`bimode eval` writes; a shard missing, given twice, of another run or unfinished is "
                         "refused by name.")


def main(cfg: EvalMergeConfig) -> int:
    from bimode.eval.report import write_report
    from bimode.eval.runner import merge_eval, read_samples
    from bimode.parallel.shards import read_manifest

    samples = merge_eval(cfg.shards, Path(cfg.out), overwrite=cfg.overwrite)
    model = read_manifest(Path(cfg.shards[0])).get("identity", {}).get("model")
    title = cfg.title or (f"bimode eval of {model}" if model else "bimode eval")
    write_report(read_samples(samples), Path(cfg.out), title=title)
    print(f"merged {len(cfg.shards)} shards; report: {Path(cfg.out) / 'report.md'}; samples: {samples}")
    return 0
