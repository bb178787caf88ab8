"""`bimode curate`: label samples thinking / non-thinking (R-4B's heuristics) and build their targets."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.data.convert import INPUT_FORMATS
from bimode.curate.pipeline import CurateConfig
from bimode.errors import UsageError
from bimode.parallel.options import ClusterConfig, make_pool

HELP = help_text("curate")


@dataclass
class CurateCommandConfig:
    """What `bimode curate` reads and writes and which models it asks; how it labels is CurateConfig."""

    input: list[str] = field(default_factory=list, metadata={"help": "record, LLaVA, ShareGPT or QA files"})
    input_format: str = field(default="auto", metadata={
        "help": f"layout of the input files: {' | '.join(INPUT_FORMATS)} (auto detects per row)"})
    out: str = field(default="", metadata={"help": "output directory (curated.jsonl, rejects.jsonl, summary.*)"})
    annotator: list[str] = field(default_factory=list, metadata={
        "help": "local model directory, vllm:DIR, or OpenAI-compatible URL; several URLs of one model share the "
                "requests and fail over when one stops answering"})
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
        self.annotator = [self.annotator] if isinstance(self.annotator, str) else list(self.annotator)
        if self.input_format not in INPUT_FORMATS:
            raise UsageError(f"input_format must be one of {', '.join(INPUT_FORMATS)}, not {self.input_format!r}")


def make_parser(prog: str = "bimode curate") -> CommandParser:
    return CommandParser((CurateCommandConfig, CurateConfig, ClusterConfig), prog=prog,
                         description=HELP + ". Recipe: --config tiny_curate (bimode configs lists the shipped ones). "
                         "On a Ray cluster: --ray_address local|auto|ADDRESS --num_workers N; as K shards started "
                         "apart: --num_shards K --shard_index i, then `bimode curate merge` (docs/cluster.md).")


def main(cmd: CurateCommandConfig, cfg: CurateConfig, cluster: ClusterConfig) -> int:
    from bimode.curate.pipeline import CurateWorker, run_curation
    from bimode.generation.openai_backend import EndpointError
    from bimode.parallel.failures import WorkerFailed
    from bimode.parallel.shards import Shard

    options = {"trust_remote_code": cmd.trust_remote_code, "concurrency": cmd.concurrency,
               "timeout_s": cmd.request_timeout, "model_name": cmd.annotator_model}
    annotator = cmd.annotator if len(cmd.annotator) > 1 else cmd.annotator[0]
    cfg = replace(cfg, annotator_name=cfg.annotator_name or " ".join(cmd.annotator))
    worker = CurateWorker(cfg, annotator=annotator, reasoner=cmd.reasoner, options=options)
    shard = Shard(cluster.shard_index, cluster.num_shards)
    run = dict(overwrite=cmd.overwrite, input_format=cmd.input_format, shard=shard,
               identity={"annotator": cmd.annotator, "reasoner": cmd.reasoner})
    try:  # on Ray each actor builds its own annotator, and this process none
        summary = run_curation(None, cmd.input, Path(cmd.out), cfg, pool=make_pool(worker, cluster), **run)
    except EndpointError as exc:  # finished batches are logged: the same command resumes
        logged = (Path(cmd.out) / "batches.jsonl").exists()
        print(f"error: {exc}" + ("; run the same command to resume" if logged else ""), file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # Ray itself failed (an actor that died, a lost node): a traceback, exit 1
        if (Path(cmd.out) / "batches.jsonl").exists():
            exc.add_note("finished batches are logged: run the same command to resume")
        raise
    if not shard.whole:
        print(f"shard {shard.index} of {shard.count} finished in {cmd.out}; when every shard has, combine them: "
              f"bimode curate merge SHARD_DIR ... --out DIR")
        return 0
    total = summary["total"]
    print(f"curated {total['curated']} ({total['think']} thinking, {total['no_think']} non-thinking), "
          f"rejected {total['rejected']}; see {Path(cmd.out) / 'summary.md'}")
    return 0

