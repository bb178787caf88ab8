"""Training rows checked before step 1 (`bimode anneal`, `bimode bpo`).

Every row of the training files is read and checked before the trainer starts, in time proportional to the files
and the images' headers, never their pixels: the row reads as a record, each image opens by its header (PIL's
Image.open without .load()) within `max_image_pixels`, the command's own rule holds (BPO: an answer to reward), and
its text fits the command's token limit. Each bad row is named (file, row, record id, field, reason) in
OUTPUT_DIR/rejects.jsonl, the shape curation and eval write (data/rejects.py), and the run stops with an error
naming the count, the first bad row and that file, unless `skip_bad_rows` sets them aside. Pixels that fail to
decode past a valid header are found only when a batch decodes them: train/bad_rows.py.

Under `accelerate launch` each process checks every world_size-th row and all gather what was found, so every
process takes the same decision on the same rows; only the first process writes the rejects file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from bimode.data.records import Record, RecordError, iter_numbered_records
from bimode.data.rejects import REJECTS_FILE, from_error, image_error, read_rejects, reject, write_rejects
from bimode.errors import UsageError

log = logging.getLogger(__name__)
# PIL's Image.MAX_IMAGE_PIXELS: past it PIL itself treats an image as a decompression bomb. Processors that cap
# pixels (Qwen-VL's max_pixels) resize larger images down, so their cap is no reason to refuse a row.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class RowCheckFields:
    """What the training commands do with bad rows (train/row_checks.py, train/bad_rows.py)."""

    skip_bad_rows: bool = field(default=False, metadata={
        "help": "rows found bad before step 1 (a missing image or one that is not an image, more than "
                "max_image_pixels, text over the token limit, an unreadable row) are named in "
                "OUTPUT_DIR/rejects.jsonl and stop the run; true: set them aside, train on the rest and log how "
                "many"})
    max_bad_rows: int = field(default=10, metadata={
        "help": "rows whose pixels fail to decode during training (past a header the check passed) are skipped "
                "(their place goes to the next row that decodes) and named in OUTPUT_DIR/rejects.jsonl; one more "
                "than this and the run saves a checkpoint and stops"})
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={
        "help": "the most pixels (width x height, read from the header) an image may have; default PIL's "
                "decompression-bomb limit"})


class CheckedRow(NamedTuple):
    file: str
    row: int  # 1-based, as RecordError counts rows
    record: Record


class ReadRows(NamedTuple):
    rows: list[CheckedRow]
    unreadable: list[dict]  # rejects of rows that did not read as records


@dataclass(frozen=True)
class TextLimit:
    """A command's token limit on a row's text. text_of(record) -> (text, the field holding most of it), raising
    RecordError for a row that has no such text; count(texts) -> token counts, one batched call."""

    text_of: Callable[[Record], tuple[str, str]]
    count: Callable[[list[str]], list[int]]
    limit: int
    says: str  # the limit as the reason names it


def token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """TextLimit.count for a tokenizer: one batched call, no special tokens."""
    # verbose=False: a row over the model's length is what is being looked for, not worth a warning
    return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


class BadRowsError(UsageError):
    """Bad training rows: the message names how many, the first, and the rejects file."""


def read_rows(paths: Sequence[str]) -> ReadRows:
    """The records of the files in order, with their file and row; rows that do not read as records become
    rejects (a missing or unreadable file still raises)."""
    rows, unreadable = [], []
    for path in map(Path, paths):  # named as RecordError names it
        for row, record in iter_numbered_records(path, on_error=lambda exc: unreadable.append(from_error(exc, step=None))):
            rows.append(CheckedRow(str(path), row, record))
    return ReadRows(rows, unreadable)


def find_bad_rows(rows: Sequence[CheckedRow], max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  text: TextLimit | None = None,
                  row_error: Callable[[Record], tuple[str, str] | None] | None = None) -> list[dict]:
    """One reject per bad row, the first problem found: row_error's (field, reason), then the images by their
    headers, then the text's tokens."""
    found, texts = [], []
    for checked in rows:
        problem = row_error(checked.record) if row_error is not None else None
        if problem is None:
            reason = image_error(checked.record, header_only=True, max_pixels=max_image_pixels)
            problem = ("images", reason) if reason is not None else None
        if problem is None and text is not None:
            try:
                texts.append((checked, *text.text_of(checked.record)))
            except RecordError as exc:  # no text to train on (a thinking target without a trace)
                problem = (exc.field, str(exc).removeprefix(f"field '{exc.field}': "))
        if problem is not None:
            found.append(_reject(checked, *problem))
    if text is not None and texts:
        counts = text.count([t for _, t, _ in texts])
        found += [_reject(checked, name, f"{n:,} tokens of text, over {text.says} (template and image tokens not "
                                         "counted)")
                  for (checked, _, name), n in zip(texts, counts) if n > text.limit]
    return found


def _reject(checked: CheckedRow, field_name: str | None, reason: str) -> dict:
    return reject(reason, file=checked.file, row=checked.row, field=field_name, id=checked.record.id, step=None)


def check_training_rows(rows: Sequence[CheckedRow], *, rank: int = 0, world: int = 1,
                        gather: Callable[[list[dict]], list[list[dict]]] | None = None,
                        **limits) -> tuple[list[CheckedRow], list[dict]]:
    """(good rows, rejects in file and row order). This process checks rows rank, rank + world, ...; `gather`
    (every process's list, the same on each) joins them, so every process returns the same. limits:
    find_bad_rows'."""
    found = find_bad_rows(rows[rank::world], **limits)
    every = [r for part in gather(found) for r in part] if gather is not None else found
    bad = {(r["file"], r["row"]) for r in every}
    return [r for r in rows if (r.file, r.row) not in bad], sorted(every, key=position_in(rows))


def position_in(rows: Sequence[CheckedRow]) -> Callable[[dict], tuple]:
    """A reject's place: its file's among the rows' files (a file with no readable row last), then its row."""
    files = {r.file: i for i, r in reversed(list(enumerate(rows)))}
    return lambda bad: (files.get(bad["file"], len(files)), bad["row"] or 0)


def describe(bad: dict) -> str:
    """A reject as one line: where, why, which record."""
    where = ", ".join(p for p in (f"file {bad['file']}" if bad.get("file") else "",
                                  f"row {bad['row']}" if bad.get("row") is not None else "",
                                  f"field '{bad['field']}'" if bad.get("field") else "") if p)
    reason = bad["reason"] if not where or bad["reason"].startswith(where) else f"{where}: {bad['reason']}"
    return f"{reason} (record {bad['id']})" if bad.get("id") else reason


def gather_every_process(found: list[dict]) -> list[list[dict]]:
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, found)
    return parts


def checked_rows(cfg, read: ReadRows, **limits) -> list[CheckedRow]:
    """The rows to train on: every row checked (check_training_rows, shared over the processes of a launch), the
    bad ones written to OUTPUT_DIR/rejects.jsonl by the first process; BadRowsError unless cfg.skip_bad_rows."""
    _ = cfg.device  # sets up the processes of a launch (TrainingArguments), which the gather below needs
    world, rank = cfg.world_size, cfg.process_index
    good, bad = check_training_rows(read.rows, rank=rank, world=world,
                                    gather=gather_every_process if world > 1 else None,
                                    max_image_pixels=cfg.max_image_pixels, **limits)
    bad = sorted(read.unreadable + bad, key=position_in(read.rows))
    path = Path(cfg.output_dir) / REJECTS_FILE
    if rank == 0 and (bad or path.exists()):  # rows that failed during an earlier run's training are kept
        write_rejects(path, [r for r in read_rejects(path) if r.get("step") is not None] + bad)
    if bad and not cfg.skip_bad_rows:
        raise BadRowsError(f"{len(bad)} bad training row{'s' * (len(bad) > 1)}, each named in {path}; the first: "
                           f"{describe(bad[0])}. Fix or remove them, or pass --skip_bad_rows true to train on the "
                           f"other {len(good)} rows")
    if not good:
        raise BadRowsError("train_files hold no row to train on" + (f": all {len(bad)} are bad, each named in {path}"
                                                                     if bad else ""))
    if bad and rank == 0:
        log.warning("skip_bad_rows: %d bad rows set aside (each named in %s); training on %d rows", len(bad), path,
                    len(good))
    return good
