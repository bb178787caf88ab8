"""`bimode curate`: label each sample thinking or non-thinking and give it the matching target.

Batches of records go through the annotator (a local model through the engine, or an OpenAI-compatible
endpoint), in this process or on Ray actors (bimode.parallel). Each finished batch is appended to `batches.jsonl`
as one line (all or nothing), and each query samples with a seed derived from the run seed and its id, so a killed
run, re-run with the same command, skips the finished batches and ends with the same output as an uninterrupted
one, and a Ray run or a sharded run merged (`merge_curation`) with the same output as one process. `curated.jsonl`,
`rejects.jsonl` and the summaries are written at the end, atomically. Rejects (unreadable rows, images that do not open,
duplicates, unclear verdicts, unverified traces) have the shape eval's have (`bimode.data.rejects`).

Generation lengths: sampled answers and reasoning traces default (None) to the `max_new_tokens` of the
annotator's / reasoner's own generation config, else 8,192 (`bimode.generation.defaults`): a real model's
non-thinking answer to a math question can run to hundreds of tokens, and a cut answer counts as wrong,
which would label the query thinking; a cut trace fails verification and loses the sample.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

from bimode.curate.dedup import DuplicateFinder
from bimode.curate.heuristics import (
    DEFAULT_BLOCKED_KEYWORDS, UNCLEAR, blocked_keyword, image_key, is_verifiable, parse_verdict, performance_label,
)
from bimode.disk_index import DiskIndex
from bimode.data.records import Record, count_rows, record_to_dict
from bimode.data.rejects import REJECTS_FILE, from_error, image_error, reject
from bimode.errors import MissingInputError, OutputExistsError, UsageError
from bimode.generation.defaults import DEFAULT_LIMIT_HELP, PAPER_MAX_NEW_TOKENS, default_max_new_tokens
from bimode.generation.types import Prompt, SamplingParams
from bimode.io import append_log, iter_log, write_jsonl
from bimode.modes import ThinkingMode
from bimode.parallel.batch_log import BatchLog, ids_hash
from bimode.parallel.batch_run import BatchRun, Progress, chunked
from bimode.parallel.pool import LocalPool
from bimode.parallel.shards import MANIFEST, Shard, check_shards, read_manifest
from bimode.scoring import accuracy_reward
from bimode.seeds import row_seed

OUTPUT_FILES = ("curated.jsonl", REJECTS_FILE, "summary.json", "summary.md")
JUDGE_MAX_NEW_TOKENS = 32  # one word is asked for; room for a short sentence, which is parsed too
PROGRESS_FILE = "batches.jsonl"  # the resume log: one line per finished batch
SET_ASIDE_FILE = "input_rejects.jsonl"  # rows set aside while reading (unreadable, duplicates), rewritten each run
INDEX_FILE = ".curate_index.sqlite"  # the scratch index of what the run has read (bimode.disk_index)


@dataclass
class CurateConfig:
    """How samples are labelled (the labelling side of `bimode curate`; the command adds inputs and models)."""

    n_samples: int = field(default=8, metadata={"help": "non-thinking answers sampled per verifiable query (N)"})
    max_correct: int = field(default=0, metadata={
        "help": "at most this many of N right -> thinking (k; 0 = all wrong, the paper's rule)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the N answers"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"tokens per sampled non-thinking answer (default: {DEFAULT_LIMIT_HELP}; an endpoint annotator "
                f"gets {PAPER_MAX_NEW_TOKENS:,}): a cut answer counts as wrong and pushes the label to thinking"})
    trace_max_new_tokens: int | None = field(default=None, metadata={
        "help": f"tokens per reasoning trace the reasoner writes (default: {DEFAULT_LIMIT_HELP}): a cut trace "
                "fails verification"})
    trace_tries: int = field(default=2, metadata={"help": "reasoning traces tried per query before rejecting"})
    batch_size: int = field(default=16, metadata={
        "help": "queries per batch: the unit of resume, of a Ray actor's work and of sharding"})
    seed: int = field(default=0, metadata={
        "help": "run seed: each query samples from a seed derived from it and the query's id, in any batch or worker"})
    judge_prompt: str | None = field(default=None, metadata={
        "help": "prompt file for the difficulty judge ({question}; default: bimode's)"})
    blocked_keywords: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKED_KEYWORDS), metadata={
        "help": "a trace containing any of these is dropped (default: phrases that name a hidden solution)"})
    blocked_keywords_file: str | None = field(default=None, metadata={
        "help": "file of keywords, one a line, that replaces blocked_keywords"})
    max_question_chars: int = field(default=8000, metadata={"help": "longer questions are rejected"})
    near_duplicate_threshold: float = field(default=0.9, metadata={
        "help": "trigram Jaccard similarity from which two questions of the same images are near-duplicates (the "
                "later is rejected; found by MinHash LSH, checked exactly: docs/cluster.md); above 1: exact only"})
    annotator_name: str = field(default="", metadata={
        "help": "name recorded with each label (default: the --annotator given)"})

    def __post_init__(self):
        if self.blocked_keywords_file:
            if not Path(self.blocked_keywords_file).is_file():
                raise MissingInputError(f"blocked_keywords_file: no file {self.blocked_keywords_file}")
            lines = Path(self.blocked_keywords_file).read_text(encoding="utf-8").splitlines()
            self.blocked_keywords = [k.strip() for k in lines if k.strip()]
        elif len(self.blocked_keywords) == 1 and Path(self.blocked_keywords[0]).is_file():
            raise UsageError(f"blocked_keywords takes the keywords themselves; to read them from "
                             f"{self.blocked_keywords[0]}, one a line, use --blocked_keywords_file")
        self.blocked_keywords = list(self.blocked_keywords)
        if self.n_samples < 1:
            raise UsageError(f"n_samples must be at least 1, got {self.n_samples}")
        if not 0 <= self.max_correct < self.n_samples:
            raise UsageError(f"max_correct must be in [0, n_samples), got {self.max_correct} of {self.n_samples}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.near_duplicate_threshold <= 0:
            raise UsageError(f"near_duplicate_threshold must be above 0 (above 1: exact duplicates only), got "
                             f"{self.near_duplicate_threshold}")


def default_judge_prompt() -> str:
    from importlib.resources import files

    return files("bimode").joinpath("prompts/judge_reasoning.txt").read_text(encoding="utf-8")


def check_record(record: Record, cfg: CurateConfig) -> dict | None:
    """Why a record cannot be curated (a reject), or None."""
    if len(record.question) > cfg.max_question_chars:
        return reject(f"question longer than {cfg.max_question_chars} characters", field="question", id=record.id)
    if record.answer_type in ("math", "numeric", "mc") and not record.answer:
        return reject("missing answer on a verifiable sample", field="answer", id=record.id)
    problem = image_error(record)
    if problem:
        return reject(f"bad image: {problem}", field="images", id=record.id)
    return None


def curate_batch(backend, records: list[Record], cfg: CurateConfig, reasoner=None,
                 judge_template: str | None = None) -> tuple[list[Record], list[dict]]:
    """Label and complete one batch; returns (curated records, rejects). Each query samples from its own seed
    (bimode.seeds.row_seed of the run seed and its id), so its label does not depend on the batch it is in."""
    kept, rejects = [], []
    good = []
    for record in records:
        problem = check_record(record, cfg)
        if problem:
            rejects.append(problem)
        else:
            good.append(record)
    verifiable = [r for r in good if is_verifiable(r)]
    open_ended = [r for r in good if not is_verifiable(r)]
    labels: dict[str, dict] = {}
    if verifiable:
        params = SamplingParams(max_new_tokens=default_max_new_tokens(backend, cfg.max_new_tokens),
                                temperature=cfg.temperature)
        prompts = [Prompt.from_record(r, [ThinkingMode.NO_THINK] * cfg.n_samples, seed=row_seed(cfg.seed, r.id))
                   for r in verifiable]
        for record, samples in zip(verifiable, backend.generate(prompts, params)):
            passes = sum(accuracy_reward(s.response, record.answer, record.answer_type, record.choices) for s in samples)
            labels[record.id] = {"heuristic": "performance", "pass_count": int(passes), "n": cfg.n_samples,
                                 "mode": performance_label(int(passes), cfg.n_samples, cfg.max_correct)}
    if open_ended:
        template = judge_template or default_judge_prompt()
        prompts = [Prompt(messages=_judge_messages(r, template), images=r.load_images(),
                          modes=[ThinkingMode.NO_THINK], id=r.id) for r in open_ended]
        replies = backend.generate(prompts, SamplingParams(max_new_tokens=JUDGE_MAX_NEW_TOKENS))  # greedy
        for record, reply in zip(open_ended, replies):
            verdict = parse_verdict(reply[0].response)
            labels[record.id] = {"heuristic": "difficulty", "verdict": verdict,
                                 "mode": verdict if verdict != UNCLEAR else None}
    need_trace = [r for r in good if labels[r.id]["mode"] == ThinkingMode.THINK and not r.reasoning]
    traces = _generate_traces(reasoner, need_trace, cfg) if reasoner is not None and need_trace else {}
    for record in good:
        label = labels[record.id]
        meta = {**record.meta, "curation": {**label, "annotator": cfg.annotator_name}}
        if label["mode"] is None:
            rejects.append(reject("unclear judge verdict", id=record.id, curation=label))
            continue
        if label["mode"] == ThinkingMode.THINK:
            trace, source = (record.reasoning, "record") if record.reasoning else traces.get(record.id, (None, None))
            if not trace:
                rejects.append(reject("thinking label but no verified reasoning trace", field="reasoning",
                                      id=record.id, curation=label))
                continue
            keyword = blocked_keyword(trace, cfg.blocked_keywords)
            if keyword:
                rejects.append(reject(f"trace contains blocked keyword {keyword!r}", field="reasoning",
                                      id=record.id, curation=label))
                continue
            meta["curation"]["trace_source"] = source
            kept.append(replace(record, mode="think", reasoning=trace, meta=meta))
        else:
            kept.append(replace(record, mode="no_think", direct_answer=record.direct_answer or record.answer,
                                meta=meta))
    return kept, rejects


def _judge_messages(record: Record, template: str) -> list[dict]:
    question = record.question
    content = [{"type": "image"} for _ in range(question.count("<image>") or len(record.images))]
    content.append({"type": "text", "text": template.format(question=question.replace("<image>", "").strip())})
    return [{"role": "user", "content": content}]


def _generate_traces(reasoner, records: list[Record], cfg: CurateConfig) -> dict:
    """Thinking-mode traces whose answer verifies against the gold (the consistency filter)."""
    traces = {}
    prompts = [Prompt.from_record(r, [ThinkingMode.THINK] * cfg.trace_tries, seed=row_seed(cfg.seed, r.id, "trace"))
               for r in records]
    params = SamplingParams(max_new_tokens=default_max_new_tokens(reasoner, cfg.trace_max_new_tokens),
                            temperature=cfg.temperature)
    for record, samples in zip(records, reasoner.generate(prompts, params)):
        for s in samples:
            parsed = s.parsed
            if parsed.mode != "think":
                continue
            if record.answer and not accuracy_reward(s.response, record.answer, record.answer_type, record.choices):
                continue
            traces[record.id] = (parsed.reasoning, "generated")
            break
    return traces


@dataclass
class CurateWorker:
    """What one worker needs to curate batches, picklable: built into a batch function on each Ray actor (one
    annotator and reasoner per actor), or in this process around backends already built."""

    cfg: CurateConfig
    annotator: str | None = None  # backend specs (bimode.generation.backends.build_backend)
    reasoner: str | None = None
    options: dict = field(default_factory=dict)
    judge_template: str | None = None  # read here from cfg.judge_prompt: the file need not exist where actors run

    def __post_init__(self):
        if self.judge_template is None and self.cfg.judge_prompt:
            self.judge_template = Path(self.cfg.judge_prompt).read_text(encoding="utf-8")

    def __call__(self):
        from bimode.generation.backends import build_backend

        annotator = build_backend(self.annotator, **self.options)
        reasoner = None
        if self.reasoner:  # the annotator's model id names nothing at the reasoner's endpoint
            options = {k: v for k, v in self.options.items() if k != "model_name"}
            reasoner = annotator if self.reasoner == self.annotator else build_backend(self.reasoner, **options)
        return self.bind(annotator, reasoner)

    def bind(self, annotator, reasoner=None):
        """The batch function around built backends: records -> (curated records, rejects)."""
        return functools.partial(curate_batch, annotator, cfg=self.cfg, reasoner=reasoner,
                                 judge_template=self.judge_template)


def unique_records(inputs: list, input_format: str, cfg: CurateConfig, index: DiskIndex,
                   set_aside) -> Iterator[tuple[Record, str]]:
    """Each record of the input files, in order, with its file, as it is read; the rows that cannot be read and the
    questions that repeat an earlier one (bimode.curate.dedup) go to `set_aside(reject)` instead."""
    from bimode.data.convert import iter_converted

    finder = DuplicateFinder(cfg.near_duplicate_threshold, index, seed=0)
    for path in inputs:
        for record in iter_converted(path, input_format, on_error=lambda exc: set_aside(from_error(exc))):
            first = finder.check(record.id, image_key(record), record.question)
            if first is None:
                yield record, str(path)
            else:
                set_aside(reject(f"duplicate of {first}", field="question", id=record.id, file=str(path)))


def run_curation(backend, inputs: list, out: Path, cfg: CurateConfig | None = None, reasoner=None,
                 overwrite: bool = False, progress: bool = True, input_format: str = "auto", pool=None,
                 shard: Shard = Shard(), identity: dict | None = None) -> dict:
    """Curate every input file into out/; resumes when out/ holds a partial run of the same command.

    The input is read as a stream: duplicates are found as rows are read (what is kept per row lives in a scratch
    index on disk, `INDEX_FILE`), and the unique records are cut into batches of `cfg.batch_size`, in input order,
    each handed out as soon as it is full, so the driver's memory does not grow with the input (bench/
    driver_memory.py). Each batch runs through `pool` (default: this process, on `backend` and `reasoner`; a
    `bimode.parallel.pool.RayPool` of `CurateWorker`s on a cluster) and is logged as it finishes. With `shard` of
    K, only the batches numbered shard.index mod K run and out/ is a shard folder for `merge_curation`; `identity`
    (JSON-able: the models' specs) joins the fingerprint that tells shards of one run from another's. Returns the
    summary (a shard's: its manifest)."""
    cfg = cfg or CurateConfig()
    start = time.time()
    out = Path(out)
    if (out / "summary.json").exists() or (out / PROGRESS_FILE).exists() or (out / MANIFEST).exists():
        if overwrite:
            for name in OUTPUT_FILES + (PROGRESS_FILE, MANIFEST, SET_ASIDE_FILE):
                (out / name).unlink(missing_ok=True)
        elif (out / "summary.json").exists():
            raise OutputExistsError(f"{out} holds a finished curation; pass --overwrite to redo it")
    out.mkdir(parents=True, exist_ok=True)
    run = BatchRun.begin(out, "curate", PROGRESS_FILE, shard,
                         settings={"cfg": asdict(cfg), "input_format": input_format}, inputs=inputs, identity=identity)
    progress_path = out / PROGRESS_FILE
    if pool is None:
        pool = LocalPool(CurateWorker(cfg).bind(backend, reasoner))
    total = sum(n or 0 for n in map(count_rows, inputs)) if shard.whole else None
    bar = Progress("curate", "query", total or None, enabled=progress)
    with DiskIndex(out / INDEX_FILE) as index, open(out / SET_ASIDE_FILE, "w", encoding="utf-8") as set_aside:
        log = BatchLog(index)
        log.scan(progress_path)
        in_flight: dict[int, dict[str, str]] = {}  # batch -> {id: file} of the batches handed out
        cut = {"batches": 0}

        def put_aside(row: dict) -> None:
            set_aside.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            bar.advance(1)

        def work() -> Iterator[tuple[int, list[Record]]]:
            for number, batch in enumerate(chunked(unique_records(inputs, input_format, cfg, index, put_aside),
                                                   cfg.batch_size)):
                cut["batches"] = number + 1
                records = [record for record, _ in batch]
                logged = log.ids_hash(number)
                if logged is not None:  # a resumed batch must be the batch this command cuts, row for row
                    if logged != ids_hash([r.id for r in records]):
                        raise OutputExistsError(
                            f"{progress_path}: batch {number} was cut from other inputs or another batch_size than "
                            "this command's; run the command that started it, or pass --overwrite")
                    bar.advance(len(records))
                elif run.owns(number):
                    in_flight[number] = {record.id: file for record, file in batch}
                    yield number, records

        def write(number: int, result: tuple[list[Record], list[dict]]) -> int:
            kept, rejects = result
            files = in_flight.pop(number)
            rows = [record_to_dict(r, image_dir=out / "curated_images", base_dir=out) for r in kept]
            rejects = [{**r, "file": r.get("file") or files.get(r.get("id"))} for r in rejects]
            append_log(progress_path, [{"batch": number, "ids": list(files), "curated": rows, "rejects": rejects}])
            return len(files)  # one line per batch: all or nothing

        run.run(pool, work(), write, bar)
        set_aside.flush()
        last = log.last()
        if last is not None and last >= cut["batches"]:
            raise OutputExistsError(f"{progress_path}: batch {last} is past the {cut['batches']} batches this "
                                    "command's inputs make; run the command that started it, or pass --overwrite")
        if not shard.whole:
            run.finish(cut["batches"], seconds=round(time.time() - start, 1))
            return read_manifest(out)
        log.scan(progress_path)  # the batches this run logged too, for the outputs
        return finish_curation(out, log.entries(), read_log_rows(out / SET_ASIDE_FILE), time.time() - start)


def read_log_rows(path: Path) -> Iterator[dict]:
    return (row for _, row in iter_log(path))


def finish_curation(out: Path, entries: Iterable[dict], input_rejects: Iterable[dict], seconds: float) -> dict:
    """curated.jsonl, rejects.jsonl and the summaries from the finished batches' log entries, in batch order, read
    and written one at a time: the rows set aside while reading come first in rejects.jsonl, then each batch's."""
    tally = Tally()
    batch_rejects = out / ".batch_rejects.jsonl"  # spooled while curated.jsonl is written: one pass over the log
    with open(batch_rejects, "w", encoding="utf-8") as spool:
        def curated_rows() -> Iterator[dict]:
            for entry in entries:
                for row in entry["rejects"]:
                    spool.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                yield from map(tally.curated, entry["curated"])

        write_jsonl(out / "curated.jsonl", curated_rows())
    write_jsonl(out / REJECTS_FILE, map(tally.rejected, itertools.chain(input_rejects, read_log_rows(batch_rejects))))
    batch_rejects.unlink()
    return summarize(out, tally, seconds)


def merge_curation(folders: list, out: Path, overwrite: bool = False) -> dict:
    """The shard folders of one `--num_shards` run combined into the single-run layout in out/ (the same files an
    unsharded run writes, rows in the same order); refused, naming them, when shards are missing, repeated, of
    another run or unfinished (bimode.parallel.shards.check_shards)."""
    out = Path(out)
    shards = check_shards(folders, "curate")
    if (out / "summary.json").exists() and not overwrite:
        raise OutputExistsError(f"{out} holds a finished curation; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    with DiskIndex(out / INDEX_FILE) as index:
        log = BatchLog(index)
        for folder, manifest in shards:
            owner = Shard(manifest["shard_index"], manifest["num_shards"])
            try:
                log.scan(folder / PROGRESS_FILE, owns=owner.owns)
            except ValueError as exc:
                raise UsageError(f"{folder}: {exc} is not shard {manifest['shard_index']}'s") from None
        have = log.numbers()
        missing = [i for i in range(shards[0][1]["num_batches"]) if i not in have]
        if missing:
            raise UsageError(f"cannot merge: batches {missing[:10]} are in no shard's {PROGRESS_FILE}")
        for folder, _ in shards:  # images the curated rows point to, relative to the shard folder, then to out/
            if (folder / "curated_images").is_dir() and folder.resolve() != out.resolve():
                shutil.copytree(folder / "curated_images", out / "curated_images", dirs_exist_ok=True)
        seconds = max(m.get("seconds", 0.0) for _, m in shards)  # the shards ran side by side: the longest
        # every shard read every input: the first one's rows set aside stand for all
        return finish_curation(out, log.entries(), read_log_rows(shards[0][0] / SET_ASIDE_FILE), seconds)


class Tally:
    """The summary's counts, kept as the rows go by."""

    def __init__(self):
        self.by_domain: dict = defaultdict(Counter)
        self.by_level: dict = defaultdict(Counter)
        self.reasons: Counter = Counter()

    def curated(self, row: dict) -> dict:
        self.by_domain[row.get("domain") or "unknown"][row["mode"]] += 1
        if row.get("level") is not None:
            self.by_level[row["level"]][row["mode"]] += 1
        return row

    def rejected(self, row: dict) -> dict:
        reason = row["reason"]
        self.reasons[reason.split(" of ")[0] if reason.startswith("duplicate") else reason] += 1
        return row


def summarize(out: Path, tally: Tally, seconds: float) -> dict:
    total = Counter()
    for counts in tally.by_domain.values():
        total.update(counts)
    curated, rejected = total["think"] + total["no_think"], sum(tally.reasons.values())
    reasons = tally.reasons
    summary = {
        "total": {"think": total["think"], "no_think": total["no_think"], "curated": curated, "rejected": rejected},
        "by_domain": {d: dict(c) for d, c in sorted(tally.by_domain.items())},
        "think_share_by_level": {str(lv): c["think"] / (c["think"] + c["no_think"])
                                 for lv, c in sorted(tally.by_level.items())},
        "rejects_by_reason": dict(reasons.most_common()),
        "seconds": round(seconds, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Curation summary", "", "| domain | thinking | non-thinking | total |", "|---|---|---|---|"]
    for domain, counts in summary["by_domain"].items():
        lines.append(f"| {domain} | {counts.get('think', 0)} | {counts.get('no_think', 0)} | {sum(counts.values())} |")
    lines.append(f"| **all** | {total['think']} | {total['no_think']} | {curated} |")
    if summary["think_share_by_level"]:
        lines += ["", "| level | labelled thinking |", "|---|---|"]
        lines += [f"| {lv} | {100 * share:.0f}% |" for lv, share in summary["think_share_by_level"].items()]
    lines += ["", f"Rejected: {rejected}", ""] + [f"- {reason}: {n}" for reason, n in reasons.most_common()]
    lines += ["", f"Time: {seconds:.0f} s"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
