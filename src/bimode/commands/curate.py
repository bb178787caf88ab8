"""`bimode curate`: label samples thinking / non-thinking (R-4B's heuristics) and build their targets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.data.convert import INPUT_FORMATS
from bimode.curate.pipeline import CurateConfig
from bimode.errors import UsageError

HELP = help_text("curate")


@dataclass
class CurateCommandConfig:
    """What `bimode curate` reads and writes and which models it asks; how it labels is CurateConfig."""

    input: list[str] = field(default_factory=list, metadata={"help": "record, LLaVA, ShareGPT or QA files"})
    input_format: str = field(default="auto", metadata={
        "help": f"layout of the input files: {' | '.join(INPUT_FORMATS)} (auto detects per row)"})
    out: str = field(default="", metadata={"help": "output directory (curated.jsonl, rejects.jsonl, summary.*)"})
    annotator: str = field(default="", metadata={"help": "local model directory or OpenAI-compatible URL"})
    annotator_model: str | None = field(default=None, metadata={"help": "model id at the endpoint (default: its first)"})
    reasoner: str | None = field(default=None, metadata={
        "help": "model or URL that writes missing reasoning traces (thinking mode; kept if verified)"})
    concurrency: int = field(default=8, metadata={"help": "parallel requests to an endpoint"})
    request_timeout: float = field(default=120.0, metadata={"help": "seconds per endpoint request"})
    overwrite: bool = field(default=False, metadata={"help": "redo a finished curation"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})

    def __post_init__(self):
        if not self.input or not self.out or not self.annotator:
            raise UsageError("--input FILE [FILE ...], --out DIR and --annotator MODEL_OR_URL are required")
        if self.input_format not in INPUT_FORMATS:
            raise UsageError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, not {self.input_format!r}")


def make_parser(prog: str = "bimode curate") -> CommandParser:
    return CommandParser((CurateCommandConfig, CurateConfig), prog=prog,
                         description=HELP + ". Recipe: --config tiny_curate (bimode configs lists the shipped ones).")


def main(cmd: CurateCommandConfig, cfg: CurateConfig) -> int:
    from bimode.curate import run_curation
    from bimode.generation.backends import build_backend

    options = {"trust_remote_code": cmd.trust_remote_code, "concurrency": cmd.concurrency,
               "timeout_s": cmd.request_timeout}
    annotator = build_backend(cmd.annotator, model_name=cmd.annotator_model, **options)
    reasoner = None
    if cmd.reasoner:
        reasoner = annotator if cmd.reasoner == cmd.annotator else build_backend(cmd.reasoner, **options)
    cfg = replace(cfg, annotator_name=cfg.annotator_name or cmd.annotator)
    summary = run_curation(annotator, cmd.input, Path(cmd.out), cfg, reasoner=reasoner, overwrite=cmd.overwrite,
                           input_format=cmd.input_format)
    total = summary["total"]
    print(f"curated {total['curated']} ({total['think']} thinking, {total['no_think']} non-thinking), "
          f"rejected {total['rejected']}; see {Path(cmd.out) / 'summary.md'}")
    return 0
