"""`bimode data synth`: generate the synthetic multimodal reasoning world."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.data import synthetic
from bimode.errors import UsageError

HELP = help_text("data", "synth")


@dataclass
class SynthConfig:
    out: str = field(default="", metadata={"help": "output directory (writes SPLIT.FORMAT) or a .jsonl/.parquet file"})
    n: int = field(default=1000, metadata={"help": "number of samples"})
    seed: int = field(default=0, metadata={"help": "generation seed"})
    split: str = field(default="train", metadata={
        "help": "train or eval; the two never share an image-question pair"})
    families: list[str] = field(default_factory=lambda: list(synthetic.DEFAULT_FAMILIES), metadata={
        "help": f"families from {', '.join(synthetic.FAMILIES)} (comma- or space-separated; default: "
                f"{' '.join(synthetic.DEFAULT_FAMILIES)})"})
    max_level: int = field(default=6, metadata={"help": "highest difficulty level (reasoning steps)"})
    format: str = field(default="jsonl", metadata={"help": "file format: jsonl or parquet"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})

    def __post_init__(self):
        if not self.out:
            raise UsageError("--out is required: the directory or file to write the samples to")
        if self.split not in ("train", "eval"):
            raise UsageError(f"split must be train or eval, not {self.split!r}")
        if self.format not in ("jsonl", "parquet"):
            raise UsageError(f"format must be jsonl or parquet, not {self.format!r}")
        suffix = Path(self.out).suffix
        if suffix in (".jsonl", ".parquet") and self.format != "jsonl" and suffix != f".{self.format}":
            raise UsageError(f"--out {self.out} is a {suffix[1:]} file but format is {self.format}: the file's "
                             f"name decides, so name it .{self.format} or drop --format")
        self.families = [f.strip() for item in self.families for f in item.split(",") if f.strip()]
        synthetic.check_families(self.families)


def make_parser(prog: str = "bimode data synth") -> CommandParser:
    return CommandParser((SynthConfig,), prog=prog, description=HELP)


def main(cfg: SynthConfig) -> int:
    from bimode.data.records import write_records

    samples = synthetic.generate(cfg.n, seed=cfg.seed, split=cfg.split, families=tuple(cfg.families),
                                 max_level=cfg.max_level, progress=True)
    out = Path(cfg.out)
    path = out / f"{cfg.split}.{cfg.format}" if out.suffix not in (".jsonl", ".parquet") else out
    write_records((s.to_record() for s in samples), path, overwrite=cfg.overwrite)
    print(f"{len(samples)} {cfg.split} samples written to {path}")
    return 0
