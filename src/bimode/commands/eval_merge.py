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
    card: bool = field(default=False, metadata={
        "help": "write the merged run's per-mode and per-level table into the shards' MODEL/README.md, the model "
                "card, as `bimode eval --card` does (a local MODEL only)"})

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

    folder = str(read_manifest(Path(cfg.shards[0])).get("identity", {}).get("model")).removeprefix("vllm:") \
        if cfg.card else ""
    if cfg.card and not Path(folder).is_dir():  # before merging: a refused --card leaves nothing half done
        raise UsageError(f"--card writes into the evaluated model's folder; the shards evaluated {folder!r}, not a "
                         "local folder")
    samples = merge_eval(cfg.shards, Path(cfg.out), overwrite=cfg.overwrite)
    model = read_manifest(Path(cfg.shards[0])).get("identity", {}).get("model")
    title = cfg.title or (f"bimode eval of {model}" if model else "bimode eval")
    metrics = write_report(read_samples(samples), Path(cfg.out), title=title)
    print(f"merged {len(cfg.shards)} shards; report: {Path(cfg.out) / 'report.md'}; samples: {samples}")
    if cfg.card:
        from bimode.eval.report import card_table
        from bimode.models.card_files import write_eval_table

        source = (f"`bimode eval` in {len(cfg.shards)} shards, merged, on "
                  + ", ".join(f"`{b}`" for b in metrics["benchmarks"]) + ".")
        print(f"model card: {write_eval_table(folder, card_table(metrics, source))}")
    return 0
