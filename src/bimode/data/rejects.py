"""Rows a stage cannot use, and why: one shape and one file (`rejects.jsonl`) for curation, evaluation and the
training commands.

In curation and eval a bad row never stops a run. Reading goes on past it, and the row goes to `rejects.jsonl` in
the stage's output folder as one JSON object:

    {"file": ..., "row": ..., "field": ..., "id": ..., "reason": ..., ...what the stage adds}

`file`, `row` and `field` say where (null where not known), `reason` says what is wrong. Curation adds its
labels, eval the benchmark name, training the step a row failed at (null: found before step 1). Rows that cannot
be read at all (invalid JSON, a wrong type) come from a `RecordError`; rows that read but whose images do not open
(a missing file, a corrupt PNG) are found by `image_error`, before any generation, so a resumed run finds them
again instead of crashing on them. `bimode anneal` and `bimode bpo` stop before step 1 on a bad row unless told
to set it aside (train/row_checks.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from bimode.data.records import Record, RecordError, image_header_size
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


def image_error(record: Record, header_only: bool = False, max_pixels: int | None = None) -> str | None:
    """Why the record's images cannot be used (missing file, undecodable data), or None when all open.

    header_only: each image is opened by its header alone (no pixel decoded), in time per file rather than per
    pixel: a missing file or one that is not an image is found, and with max_pixels an image of more pixels;
    pixel data broken past a valid header is not (the training commands' check before step 1)."""
    if not header_only:
        try:
            record.load_images()
        except ValueError as exc:
            return str(exc)
        return None
    for i, image in enumerate(record.images):
        where = f"image {i}: " if len(record.images) > 1 else ""
        try:
            width, height = image_header_size(image)
        except ValueError as exc:
            return f"{where}{exc}"
        if max_pixels is not None and width * height > max_pixels:
            return f"{where}{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
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
