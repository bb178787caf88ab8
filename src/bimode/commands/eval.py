"""`bimode eval MODEL | --endpoint URL`: benchmarks in each mode, scored, with a report."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError
from bimode.eval.runner import EvalConfig
from bimode.parallel.options import ClusterConfig, make_pool

DESCRIPTION = ("Evaluate a local model directory, or a model behind an OpenAI-compatible server (--endpoint), in "
               "each mode. `bimode eval compare A B` compares two runs; `bimode eval calibrate RUN` picks auto "
               "mode's think threshold from a run. Recipe: --config tiny_eval (bimode configs lists the shipped ones). On a Ray "
               "cluster: --ray_address local|auto|ADDRESS --num_workers N; as K shards started apart: --num_shards K "
               "--shard_index i, then `bimode eval merge` (docs/cluster.md).")


@dataclass
class EvalCommandConfig:
    """What `bimode eval` evaluates and where it writes; how it generates is EvalConfig."""

    model: str | None = field(default=None, metadata={
        "help": "local model directory or LoRA adapter folder (or give --endpoint)"})
    endpoint: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible base URL (bimode serve, vLLM) to evaluate instead of a local model; modes are "
                "forced through chat_template_kwargs.thinking_mode"})
    endpoint_model: str | None = field(default=None, metadata={
        "help": "model id at --endpoint (default: the first /v1/models lists)"})
    api_key: str | None = field(default=None, metadata={
        "help": "bearer key for --endpoint (default: $BIMODE_API_KEY, else $OPENAI_API_KEY)"})
    concurrency: int = field(default=8, metadata={"help": "parallel requests to --endpoint"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds per --endpoint request"})
    bench: list[str] = field(default_factory=list, metadata={
        "help": "benchmark record files (JSONL/JSON/Parquet)"})
    out: str = field(default="", metadata={
        "help": "run directory (samples.jsonl, metrics.json, report.md, PNGs)"})
    judge: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible URL of an LLM judge for text answers"})
    judge_model: str | None = field(default=None, metadata={"help": "judge model id (default: the endpoint's first)"})
    overwrite: bool = field(default=False, metadata={"help": "start again instead of resuming"})
    card: bool = field(default=False, metadata={
        "help": "write this run's per-mode and per-level table into MODEL/README.md, the model card, between "
                "markers, so a later --card run replaces it (a folder without a card gets a short one); a local "
                "MODEL and a whole run only (not an --endpoint or one shard)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})

    def __post_init__(self):
        if self.model is not None and self.endpoint is not None:
            raise UsageError("bimode eval takes a local MODEL directory or --endpoint URL (one of the two); the "
                             "model id at an endpoint is --endpoint_model")
        if self.model is None and self.endpoint is None:
            raise UsageError("bimode eval takes a local MODEL directory or --endpoint URL (one of the two)")
        if self.endpoint_model and not self.endpoint:
            raise UsageError("--endpoint_model names the model at an --endpoint; a local model is MODEL")
        if self.judge_model and not self.judge:
            raise UsageError("--judge_model names the model at a --judge URL; give --judge too")
        if self.card and (self.endpoint or not Path(self.model.removeprefix("vllm:")).is_dir()):
            raise UsageError(f"--card writes into a local MODEL folder's card; {self.endpoint or self.model} is not a "
                             "local folder")
        if not self.bench or not self.out:
            raise UsageError("--bench FILE [FILE ...] and --out DIR are required")


def make_parser(prog: str = "bimode eval") -> CommandParser:
    return CommandParser((EvalCommandConfig, EvalConfig, ClusterConfig), prog=prog, description=DESCRIPTION,
                         positional={"model": "?"})


def main(cmd: EvalCommandConfig, cfg: EvalConfig, cluster: ClusterConfig) -> int:
    from bimode.eval.report import write_report
    from bimode.eval.runner import EvalWorker, read_samples, run_eval
    from bimode.generation.openai_backend import EndpointError
    from bimode.parallel.failures import WorkerFailed
    from bimode.parallel.pool import LocalPool
    from bimode.parallel.shards import Shard

    out = Path(cmd.out)
    if cmd.card and cluster.num_shards > 1:
        raise UsageError("--card needs the whole run's table: run the shards without it, then `bimode eval merge "
                         "SHARD_DIR ... --out DIR --card`")
    if cmd.overwrite and out.exists():
        shutil.rmtree(out)
    if cmd.endpoint:
        # the modes travel as chat_template_kwargs.thinking_mode, one request per (question, mode)
        api_key = cmd.api_key or os.environ.get("BIMODE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        model, options = cmd.endpoint, {"model_name": cmd.endpoint_model, "api_key": api_key,
                                        "concurrency": cmd.concurrency, "timeout_s": cmd.request_timeout}
    else:
        model, options = cmd.model, {"trust_remote_code": cmd.trust_remote_code, "max_batch_rows": cfg.batch_size * 3}
    worker = EvalWorker(cfg, model, options, judge=cmd.judge, judge_options={"model_name": cmd.judge_model})
    shard = Shard(cluster.shard_index, cluster.num_shards)
    try:
        if cluster.ray_address:  # each actor builds its own model and judge, this process none
            pool, served = make_pool(worker, cluster), cmd.endpoint_model
        else:
            engine, judge = worker.build()
            pool, served = LocalPool(worker.bind(engine, judge)), getattr(engine, "model", None)
        title = f"bimode eval of {served or 'the model'} at {cmd.endpoint}" if cmd.endpoint else \
            f"bimode eval of {cmd.model}"
        samples = run_eval(None, cmd.bench, out, cfg, pool=pool, shard=shard,
                           identity={"model": model, "judge": cmd.judge})
    except EndpointError as exc:  # what is scored is kept: the same command resumes
        print(f"error: {exc}" + (f"; run {_again(cmd)} to resume" if (out / "samples.jsonl").exists() else ""),
              file=sys.stderr)
        return 2
    except WorkerFailed as exc:  # Ray itself failed (an actor that died, a lost node): a traceback, exit 1
        if (out / "samples.jsonl").exists():
            exc.add_note(f"what is scored is kept: run {_again(cmd)} to resume")
        raise
    if not shard.whole:
        print(f"shard {shard.index} of {shard.count} finished in {out}; when every shard has, combine them: "
              "bimode eval merge SHARD_DIR ... --out DIR")
        return 0
    metrics = write_report(read_samples(samples), out, title=title)
    rejected = metrics["rejected"]["total"]
    if rejected:
        print(f"rejected {rejected} rows (not scored; reasons in {out / 'rejects.jsonl'})")
    print(f"report: {out / 'report.md'}; metrics: {out / 'metrics.json'}; samples: {samples}")
    if cmd.card:
        from bimode.eval.report import card_source, card_table
        from bimode.models.card_files import write_eval_table

        table = card_table(metrics, card_source(cmd.bench, cfg))
        print(f"model card: {write_eval_table(cmd.model.removeprefix('vllm:'), table)}")
    return 0


def _again(cmd: EvalCommandConfig) -> str:
    return "the same command without --overwrite" if cmd.overwrite else "the same command"
