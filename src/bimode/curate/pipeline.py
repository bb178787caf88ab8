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
import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bimode.curate.heuristics import (
    DEFAULT_BLOCKED_KEYWORDS, UNCLEAR, blocked_keyword, find_duplicates, is_verifiable, parse_verdict,
    performance_label,
)
from bimode.data.records import Record, record_to_dict
from bimode.data.rejects import REJECTS_FILE, from_error, image_error, reject, write_rejects
from bimode.errors import MissingInputError, OutputExistsError, UsageError
from bimode.generation.defaults import DEFAULT_LIMIT_HELP, PAPER_MAX_NEW_TOKENS, default_max_new_tokens
from bimode.generation.types import Prompt, SamplingParams
from bimode.io import append_log, read_log, write_jsonl
from bimode.modes import ThinkingMode
from bimode.parallel.pool import LocalPool
from bimode.parallel.batch_run import BatchRun, Progress, cut
from bimode.parallel.shards import MANIFEST, Shard, check_shards, read_manifest
from bimode.scoring import accuracy_reward
from bimode.seeds import row_seed

OUTPUT_FILES = ("curated.jsonl", REJECTS_FILE, "summary.json", "summary.md")
JUDGE_MAX_NEW_TOKENS = 32  # one word is asked for; room for a short sentence, which is parsed too
PROGRESS_FILE = "batches.jsonl"  # the resume log: one line per finished batch


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
        "help": "trigram Jaccard similarity above which two questions are near-duplicates (the later is rejected)"})
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


def _finished_batches(progress: Path) -> dict[int, dict]:
    """Batches already done: one JSON line each; a line cut by a kill is skipped (the batch is redone)."""
    return {entry["batch"]: entry for entry in read_log(progress)}


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


def read_inputs(inputs: list, input_format: str = "auto") -> tuple[list[Record], list[dict], dict[str, str]]:
    """Every record of the input files, the rows that could not be read (as rejects), and each id's file."""
    from bimode.data.convert import iter_converted

    read_rejects: list[dict] = []
    records, source = [], {}
    for path in inputs:
        for record in iter_converted(path, input_format, on_error=lambda exc: read_rejects.append(from_error(exc))):
            records.append(record)
            source.setdefault(record.id, str(path))
    return records, read_rejects, source


def run_curation(backend, inputs: list, out: Path, cfg: CurateConfig | None = None, reasoner=None,
                 overwrite: bool = False, progress: bool = True, input_format: str = "auto", pool=None,
                 shard: Shard = Shard(), identity: dict | None = None) -> dict:
    """Curate every input file into out/; resumes when out/ holds a partial run of the same command.

    The unique records are cut into batches of `cfg.batch_size`, in input order; each batch runs through `pool`
    (default: this process, on `backend` and `reasoner`; a `bimode.parallel.pool.RayPool` of `CurateWorker`s on a
    cluster) and is logged as it finishes. With `shard` of K, only the batches numbered shard.index mod K run and
    out/ is a shard folder for `merge_curation`; `identity` (JSON-able: the models' specs) joins the fingerprint
    that tells shards of one run from another's. Returns the summary (a shard's: its manifest)."""
    cfg = cfg or CurateConfig()
    start = time.time()
    out = Path(out)
    if (out / "summary.json").exists() or (out / PROGRESS_FILE).exists() or (out / MANIFEST).exists():
        if overwrite:
            for name in OUTPUT_FILES + (PROGRESS_FILE, MANIFEST):
                (out / name).unlink(missing_ok=True)
        elif (out / "summary.json").exists():
            raise OutputExistsError(f"{out} holds a finished curation; pass --overwrite to redo it")
    out.mkdir(parents=True, exist_ok=True)
    records, read_rejects, source = read_inputs(inputs, input_format)
    duplicates = find_duplicates(records, cfg.near_duplicate_threshold)
    unique = [r for r in records if r.id not in duplicates]
    batches = cut(unique, cfg.batch_size)
    run = BatchRun.begin(out, "curate", PROGRESS_FILE, len(batches), shard,
                         settings={"cfg": asdict(cfg), "input_format": input_format}, inputs=inputs, identity=identity)

    def with_file(rows: list[dict]) -> list[dict]:  # a record's rejects name the file it came from
        return [{**r, "file": r.get("file") or source.get(r.get("id"))} for r in rows]

    progress_path = out / PROGRESS_FILE
    done = _finished_batches(progress_path)
    for index, entry in done.items():  # a resumed batch must be the batch this command cuts, row for row
        if index >= len(batches) or entry["ids"] != [r.id for r in batches[index]]:
            raise OutputExistsError(f"{progress_path}: batch {index} was cut from other inputs or another batch_size "
                                    "than this command's; run the command that started it, or pass --overwrite")
    mine = [i for i in range(len(batches)) if run.owns(i)]
    if pool is None:
        pool = LocalPool(CurateWorker(cfg).bind(backend, reasoner))

    def write(index: int, result: tuple[list[Record], list[dict]]) -> int:
        kept, rejects = result
        rows = [record_to_dict(r, image_dir=out / "curated_images", base_dir=out) for r in kept]
        entry = {"batch": index, "ids": [r.id for r in batches[index]], "curated": rows,
                 "rejects": with_file(rejects)}
        append_log(progress_path, [entry])  # one line per batch: all or nothing
        done[index] = entry
        return len(batches[index])

    run.run(pool, ((i, batches[i]) for i in mine if i not in done), write,
            Progress("curate", "query", total=sum(len(batches[i]) for i in mine),
                     done=sum(len(batches[i]) for i in mine if i in done)) if progress else None)
    input_rejects = read_rejects + with_file([reject(f"duplicate of {first}", field="question", id=rid)
                                              for rid, first in duplicates.items()])
    if not shard.whole:
        run.finish(input_rejects=input_rejects, seconds=round(time.time() - start, 1))
        return read_manifest(out)
    return finish_curation(out, [done[i] for i in sorted(done)], input_rejects, time.time() - start)


def finish_curation(out: Path, entries: list[dict], input_rejects: list[dict], seconds: float) -> dict:
    """curated.jsonl, rejects.jsonl and the summaries from the finished batches' log entries, in batch order."""
    curated = [row for entry in entries for row in entry["curated"]]
    rejects = input_rejects + [row for entry in entries for row in entry["rejects"]]
    write_jsonl(out / "curated.jsonl", curated)
    rejects = write_rejects(out / REJECTS_FILE, rejects)
    return summarize(out, curated, rejects, seconds)


def merge_curation(folders: list, out: Path, overwrite: bool = False) -> dict:
    """The shard folders of one `--num_shards` run combined into the single-run layout in out/ (the same files an
    unsharded run writes, rows in the same order); refused, naming them, when shards are missing, repeated, of
    another run or unfinished (bimode.parallel.shards.check_shards)."""
    out = Path(out)
    shards = check_shards(folders, "curate")
    if (out / "summary.json").exists() and not overwrite:
        raise OutputExistsError(f"{out} holds a finished curation; pass --overwrite to replace it")
    entries: dict[int, dict] = {}
    for folder, manifest in shards:
        for index, entry in _finished_batches(folder / PROGRESS_FILE).items():
            if not Shard(manifest["shard_index"], manifest["num_shards"]).owns(index):
                raise UsageError(f"{folder}: batch {index} is not shard {manifest['shard_index']}'s")
            entries[index] = entry
    missing = [i for i in range(shards[0][1]["num_batches"]) if i not in entries]
    if missing:
        raise UsageError(f"cannot merge: batches {missing[:10]} are in no shard's {PROGRESS_FILE}")
    out.mkdir(parents=True, exist_ok=True)
    for folder, _ in shards:  # images the curated rows point to, relative to the shard folder, then to out/
        if (folder / "curated_images").is_dir() and folder.resolve() != out.resolve():
            shutil.copytree(folder / "curated_images", out / "curated_images", dirs_exist_ok=True)
    seconds = max(m.get("seconds", 0.0) for _, m in shards)  # the shards ran side by side: the longest
    return finish_curation(out, [entries[i] for i in sorted(entries)], shards[0][1].get("input_rejects", []), seconds)


def summarize(out: Path, curated: list[dict], rejects: list[dict], seconds: float) -> dict:
    by_domain: dict = defaultdict(Counter)
    by_level: dict = defaultdict(Counter)
    for row in curated:
        by_domain[row.get("domain") or "unknown"][row["mode"]] += 1
        if row.get("level") is not None:
            by_level[row["level"]][row["mode"]] += 1
    total = Counter(row["mode"] for row in curated)
    reasons = Counter(r["reason"].split(" of ")[0] if r["reason"].startswith("duplicate") else r["reason"]
                      for r in rejects)
    summary = {
        "total": {"think": total["think"], "no_think": total["no_think"], "curated": len(curated),
                  "rejected": len(rejects)},
        "by_domain": {d: dict(c) for d, c in sorted(by_domain.items())},
        "think_share_by_level": {str(lv): c["think"] / (c["think"] + c["no_think"]) for lv, c in sorted(by_level.items())},
        "rejects_by_reason": dict(reasons.most_common()),
        "seconds": round(seconds, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["# Curation summary", "", "| domain | thinking | non-thinking | total |", "|---|---|---|---|"]
    for domain, counts in summary["by_domain"].items():
        lines.append(f"| {domain} | {counts.get('think', 0)} | {counts.get('no_think', 0)} | {sum(counts.values())} |")
    lines.append(f"| **all** | {total['think']} | {total['no_think']} | {len(curated)} |")
    if summary["think_share_by_level"]:
        lines += ["", "| level | labelled thinking |", "|---|---|"]
        lines += [f"| {lv} | {100 * share:.0f}% |" for lv, share in summary["think_share_by_level"].items()]
    lines += ["", f"Rejected: {len(rejects)}", ""] + [f"- {reason}: {n}" for reason, n in reasons.most_common()]
    lines += ["", f"Time: {seconds:.0f} s"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
