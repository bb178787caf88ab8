"""Rows a stage cannot use, and why: one shape and one file (`rejects.jsonl`) for curation and evaluation.

A bad row never stops a run. Reading goes on past it, and the row goes to `rejects.jsonl` in the stage's
output folder as one JSON object:

    {"file": ..., "row": ..., "field": ..., "id": ..., "reason": ..., ...what the stage adds}

`file`, `row` and `field` say where (null where not known), `reason` says what is wrong. Curation adds its
labels, eval the benchmark name. Rows that cannot be read at all (invalid JSON, a wrong type) come from a
`RecordError`; rows that read but whose images do not open (a missing file, a corrupt PNG) are found by
`image_error`, before any generation, so a resumed run finds them again instead of crashing on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from bimode.data.records import Record, RecordError
from bimode.io import read_log, write_jsonl

REJECTS_FILE = "rejects.jsonl"
KEYS = ("file", "row", "field", "id", "reason")


def reject(reason: str, *, file: str | os.PathLike | None = None, row: int | None = None,
           field: str | None = None, id: str | None = None, **extra) -> dict:
    """One reject in the shared shape."""
    return {"file": None if file is None else str(file), "row": row, "field": field, "id": id, "reason": reason,
            **extra}


def from_error(exc: RecordError, id: str | None = None, **extra) -> dict:
    """A reject from a RecordError (its file, row and field). Without an id, a row that could not be read is
    named `<file name>:row<n>`."""
    if id is None and exc.path is not None and exc.row is not None:
        id = f"{Path(exc.path).name}:row{exc.row}"
    return reject(str(exc), file=exc.path, row=exc.row, field=exc.field, id=id, **extra)


def image_error(record: Record) -> str | None:
    """Why the record's images cannot be used (missing file, undecodable data), or None when all open."""
    try:
        record.load_images()
    except ValueError as exc:
        return str(exc)
    return None


def _key(row: dict) -> str:
    return json.dumps({k: row.get(k) for k in KEYS}, sort_keys=True, default=str)


def unique(rows: Iterable[dict]) -> list[dict]:
    """The rows in order, each (file, row, field, id, reason) once: a re-run that finds a bad row again
    does not list it twice."""
    seen, out = set(), []
    for row in rows:
        key = _key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def read_rejects(path: str | os.PathLike) -> list[dict]:
    """The rejects in a file (none when it does not exist); a line cut by a kill is skipped."""
    return read_log(path)


def write_rejects(path: str | os.PathLike, rows: Iterable[dict]) -> list[dict]:
    """Write the rejects (duplicates dropped) atomically: the file is the old one or the new one, never half."""
    rows = unique(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return rows
