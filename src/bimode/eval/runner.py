"""`bimode eval`: run benchmarks in each mode through the engine, score, and write per-sample rows.

Per-sample rows go to `samples.jsonl`, appended batch by batch and keyed by (bench, id, mode): a re-run
skips what is there, so an interrupted eval resumes. Bad benchmark rows (unreadable, no gold answer, an image
that is missing or does not decode) go to `rejects.jsonl` with file, row, field and reason, as curation's do
(`bimode.data.rejects`), and every other row is scored. They are found as the benchmarks are read (a stream,
batches going out as they are cut), written when the reading ends, and found again by a resumed run, which
rewrites the file rather than appending to it.

Generation length: `max_new_tokens=None` (the default) is the model's generation config's limit, else the
paper's 8,192 (`bimode.generation.defaults`).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from bimode.disk_index import DiskIndex, key64
from bimode.data.records import Record, RecordError, count_rows, iter_numbered_records
from bimode.data.rejects import REJECTS_FILE, from_error, image_error, read_rejects, write_rejects
from bimode.errors import OutputExistsError, UsageError
from bimode.generation.defaults import DEFAULT_LIMIT_HELP, PAPER_MAX_NEW_TOKENS, default_max_new_tokens
from bimode.generation.types import Prompt, SamplingParams, check_think_threshold
from bimode.io import append_log, iter_log, read_log, write_jsonl
from bimode.modes import ThinkingMode, parse_mode_field
from bimode.parallel.batch_run import BatchRun, Progress, chunked
from bimode.parallel.pool import LocalPool
from bimode.parallel.shards import Shard, check_shards
from bimode.scoring import accuracy_reward

INDEX_FILE = ".eval_index.sqlite"  # the scratch index of what the run has read (bimode.disk_index)


@dataclass
class EvalConfig:
    """How a model is evaluated (the generation side of `bimode eval`; the command adds where to)."""

    modes: list[str] = field(default_factory=lambda: ["auto", "think", "no_think"], metadata={
        "help": "modes to evaluate each question in (comma- or space-separated): auto, think, no_think"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"generated-token limit per sample (default: {DEFAULT_LIMIT_HELP}; an endpoint gets "
                f"{PAPER_MAX_NEW_TOKENS:,}); a cut response scores 0"})
    max_thinking_tokens: int | None = field(default=None, metadata={"help": "thinking budget in tokens"})
    think_threshold: float | None = field(default=None, metadata={
        "help": "auto mode thinks iff p_think >= this (pick it with `bimode eval calibrate`)"})
    batch_size: int = field(default=32, metadata={
        "help": "questions per generation batch: the unit of a Ray actor's work and of sharding"})
    limit: int | None = field(default=None, metadata={"help": "first N records of each benchmark"})

    def __post_init__(self):
        items = [self.modes] if isinstance(self.modes, str) else self.modes
        self.modes = [parse_mode_field("modes", m.strip()) for item in items for m in item.split(",") if m.strip()]
        if not self.modes:
            raise UsageError("modes is empty: give at least one of auto, think, no_think")
        check_think_threshold(self.think_threshold)
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, got {self.batch_size}")


def bench_name(path: str | os.PathLike) -> str:
    path = Path(path)
    return path.parent.name + "/" + path.stem if path.stem in ("eval", "test", "train", "data") else path.stem


def iter_bench(path, limit=None, set_aside=None, ids: DiskIndex | None = None,
               check_images: bool = True) -> Iterator[Record]:
    """The usable records of a benchmark file, as they are read. Bad rows, rows without a gold answer, rows that
    repeat an earlier row's id and (with check_images) rows whose images do not open go to `set_aside(reject)`
    (without it, the first raises); `limit` counts usable records. `ids` keeps the ids met (a scratch index on disk:
    a benchmark of millions of rows costs the driver no memory per row)."""
    name = bench_name(path)
    ids = ids or DiskIndex(None)
    ids.table("ids", ("id", "row"))

    def reject(exc: RecordError, record_id: str | None = None) -> None:
        if set_aside is None:
            raise exc
        set_aside(from_error(exc, id=record_id, bench=name))

    usable = 0
    for row, record in iter_numbered_records(path, on_error=reject):
        key = key64(name, record.id)
        first = ids.get("ids", key)
        if first is not None and first[0] == record.id:  # samples are keyed by id: a second row would overwrite
            reject(RecordError(f"id {record.id} repeats row {first[1]}'s", path, row, "id"), record.id)
            continue
        ids.put("ids", key, record.id, row)
        if not record.answer:
            reject(RecordError(f"record {record.id} has no gold answer", path, row, "answer"), record.id)
            continue
        problem = image_error(record) if check_images else None
        if problem:
            reject(RecordError(problem, path, row, "images"), record.id)
            continue
        yield record
        usable += 1
        if limit and usable >= limit:
            return


JUDGE_PROMPT = (
    "Reference answer: {gold}\nCandidate answer: {answer}\n"
    "Does the candidate give the same answer as the reference? Reply with only yes or no."
)


def judge_score(judge, answer: str, gold: str) -> float:
    prompt = Prompt(messages=[{"role": "user", "content": JUDGE_PROMPT.format(gold=gold, answer=answer)}],
                    modes=[ThinkingMode.NO_THINK])
    reply = judge.generate([prompt], SamplingParams(max_new_tokens=8))[0][0].parsed.answer.lower()
    return 1.0 if re.match(r"\W*yes\b", reply) else 0.0


def score(record: Record, response: str, judge=None) -> float:
    if judge is not None and (record.answer_type == "text"):
        from bimode.modes import extract_answer

        final = extract_answer(response)
        return 0.0 if final is None else judge_score(judge, final, record.answer)
    return accuracy_reward(response, record.answer, record.answer_type, record.choices)


def eval_batch(engine, chunk: list[tuple[str, Record, list[ThinkingMode]]], params: SamplingParams,
               judge=None) -> list[dict]:
    """Generate and score one batch of (benchmark, record, modes to run): its samples.jsonl rows."""
    results = engine.generate([Prompt.from_record(record, todo) for _, record, todo in chunk], params)
    rows = []
    for (name, record, todo), completions in zip(chunk, results):
        for mode, c in zip(todo, completions):
            parsed = c.parsed
            rows.append({
                "bench": name, "id": record.id, "mode": mode.value, "family": record.family,
                "level": record.level, "domain": record.domain, "answer_type": record.answer_type,
                "gold": record.answer, "response": c.response, "answer": parsed.answer,
                "parsed_mode": parsed.mode, "thought": parsed.mode in ("think", "malformed"),
                "score": score(record, c.response, judge), "tokens": c.num_tokens,
                "thinking_tokens": c.thinking_tokens, "answer_tokens": c.answer_tokens,
                "finish_reason": c.finish_reason, "p_think": c.p_think,
            })
    return rows


def sampling_params(engine, cfg: EvalConfig) -> SamplingParams:
    return SamplingParams(max_new_tokens=default_max_new_tokens(engine, cfg.max_new_tokens),
                          max_thinking_tokens=cfg.max_thinking_tokens, think_threshold=cfg.think_threshold)


@dataclass
class EvalWorker:
    """What one Ray actor needs to evaluate batches, picklable: the model (or endpoint) and judge specs and their
    options (bimode.generation.backends.build_backend), built once per actor."""

    cfg: EvalConfig
    model: str
    options: dict = field(default_factory=dict)
    judge: str | None = None
    judge_options: dict = field(default_factory=dict)

    def __call__(self):
        return self.bind(*self.build())

    def build(self) -> tuple:
        """(engine, judge) as the specs name them."""
        from bimode.generation.backends import build_backend

        judge = build_backend(self.judge, **self.judge_options) if self.judge else None
        return build_backend(self.model, **self.options), judge

    def bind(self, engine, judge=None):
        """The batch function around built backends: [(benchmark, record, modes)] -> samples.jsonl rows."""
        return functools.partial(eval_batch, engine, params=sampling_params(engine, self.cfg), judge=judge)


def run_eval(engine, bench_paths: list, out_dir: Path, cfg: EvalConfig | None = None, progress: bool = True,
             judge=None, pool=None, shard: Shard = Shard(), identity: dict | None = None) -> Path:
    """Generate and score every (record, mode); returns the samples file. `judge`: a backend (an LLM judge)
    for open-ended answers (answer_type "text"), else they are matched. Rows that cannot be evaluated are
    written to out_dir/rejects.jsonl (see the module docstring).

    The benchmarks are read as a stream: the usable records, in order, are cut into batches of `cfg.batch_size`,
    each handed out as soon as it is full, and what the driver must remember per row (the ids met, the samples
    already scored) lives in a scratch index on disk, so its memory does not grow with the benchmarks (bench/
    driver_memory.py). Each batch runs the modes it still lacks through `pool` (default: this process, on `engine`;
    a `bimode.parallel.pool.RayPool` of `EvalWorker`s on a cluster), its rows appended as it finishes. With `shard`
    of K only the batches numbered shard.index mod K run, and out_dir is a shard folder for `merge_eval`
    (`identity`, the model's spec, joins the fingerprint that tells shards of one run from another's)."""
    cfg = cfg or EvalConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    modes = [ThinkingMode.parse(m) for m in cfg.modes]
    run = BatchRun.begin(out_dir, "eval", "samples.jsonl", shard, settings={"cfg": asdict(cfg)},
                         inputs=bench_paths, identity=identity)
    if pool is None:
        pool = LocalPool(EvalWorker(cfg, "").bind(engine, judge))
    rows_known = [count_rows(p) for p in bench_paths]
    total = None
    if shard.whole and None not in rows_known:
        total = len(modes) * sum(min(n, cfg.limit) if cfg.limit else n for n in rows_known)
    bar = Progress("eval", "sample", total or None, enabled=progress)
    spool = out_dir / ".rejects.new.jsonl"
    with DiskIndex(out_dir / INDEX_FILE, {"done": ()}) as index, open(spool, "w", encoding="utf-8") as new_rejects:
        index.put_many("done", ((key64(row["bench"], str(row["id"]), row["mode"]),) for _, row in iter_log(samples_path)))

        def set_aside(row: dict) -> None:
            new_rejects.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            bar.advance(len(modes))

        def records() -> Iterator[tuple[str, Record]]:
            for path in bench_paths:
                name = bench_name(path)
                for record in iter_bench(path, cfg.limit, set_aside, index):
                    yield name, record

        def work() -> Iterator[tuple[int, list]]:
            for number, batch in enumerate(chunked(records(), cfg.batch_size)):
                chunk = [(name, record, [m for m in modes if not index.has("done", key64(name, str(record.id), m.value))])
                         for name, record in batch]
                bar.advance(sum(len(modes) - len(todo) for _, _, todo in chunk))
                chunk = [item for item in chunk if item[2]]
                if chunk and run.owns(number):
                    yield number, chunk
                cut["batches"] = number + 1
            new_rejects.flush()  # the benchmarks are read: their rejects are known
            write_eval_rejects(out_dir, bench_paths, spool)

        def write(index_: int, rows: list[dict]) -> int:
            append_log(samples_path, rows)  # one write per batch: a kill loses at most the batches in flight
            return len(rows)

        cut = {"batches": 0}
        run.run(pool, work(), write, bar)
    spool.unlink(missing_ok=True)
    run.finish(cut["batches"])
    return samples_path


def write_eval_rejects(out_dir: Path, bench_paths: list, spool: Path) -> None:
    """rejects.jsonl: this run's benchmarks' rejects (read afresh: they replace the old ones), other benchmarks'
    kept."""
    names = {bench_name(p) for p in bench_paths}
    path = out_dir / REJECTS_FILE
    kept = (row for _, row in iter_log(path) if row.get("bench") not in names)
    rows = itertools.chain(kept, (row for _, row in iter_log(spool)))  # written aside, then put in the old one's place
    first = next(rows, None)
    if first is not None or path.exists():
        write_jsonl(path, itertools.chain([] if first is None else [first], rows))


def merge_eval(folders: list, out_dir: Path, overwrite: bool = False) -> Path:
    """The shard folders of one `--num_shards` eval combined into one run folder: samples.jsonl (every shard's
    samples, sorted by benchmark, id and mode; an unsharded run lists them batch by batch, and nothing computed
    from them depends on the order) and rejects.jsonl as an unsharded run writes them; refused, naming them, when
    shards are missing, repeated, of another run or unfinished, or when two shards hold the same sample."""
    shards = check_shards(folders, "eval")
    out_dir = Path(out_dir)
    if (out_dir / "samples.jsonl").exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already holds samples.jsonl; pass --overwrite to replace it")
    rows, owner = [], {}
    for folder, _ in shards:
        for row in read_samples(folder / "samples.jsonl"):
            key = (row["bench"], row["id"], row["mode"])
            if key in owner:
                raise UsageError(f"cannot merge: sample {key} is in both {owner[key]} and {folder} (the same shard "
                                 "copied twice?)")
            owner[key] = folder
            rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "samples.jsonl", sorted(rows, key=lambda r: (r["bench"], str(r["id"]), r["mode"])))
    rejects = read_rejects(shards[0][0] / REJECTS_FILE)  # every shard reads every benchmark: the same rejects
    if rejects:
        write_rejects(out_dir / REJECTS_FILE, rejects)
    return out_dir / "samples.jsonl"


def read_samples(path: Path) -> list[dict]:
    rows = read_log(path)
    for n, row in enumerate(rows, 1):
        missing = [k for k in ("bench", "id", "mode") if k not in row]
        if missing:
            raise UsageError(f"{path}: sample {n} has no {missing[0]!r} field (not a `bimode eval` samples.jsonl?)")
    # one row per key: the last write wins (a resumed batch may repeat a half-written one)
    return list({(r["bench"], r["id"], r["mode"]): r for r in rows}.values())
