"""Files that survive a kill: atomic rewrites, and the append-only JSONL logs that make long jobs resumable.

Curation (`batches.jsonl`, one line per finished batch) and evaluation (`samples.jsonl`, one line per scored
sample) resume from such a log. A kill mid-write can leave the last line cut: reading skips it (its work is
redone), and the next append first ends it with a newline, so the new lines never fuse with it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


def atomic_write_text(path: str | os.PathLike, text: str | Iterable[str]) -> None:
    """Write text (a string, or pieces of it as they come: nothing held whole) so that the file is either the old
    one or the new one, never a half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines([text] if isinstance(text, str) else text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file it replaces was not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def jsonl_text(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Rewrite a JSONL file atomically, writing the rows as they come."""
    atomic_write_text(path, (json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The complete lines of a JSONL log, in order; blank lines and a line cut by a kill are skipped."""
    return [row for _, row in iter_log(path)]


def iter_log(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(byte offset, row) of each complete line of a JSONL log, as `read_log` reads them, one at a time."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as fh:
        offset = 0
        for line in fh:
            if line.strip():
                try:
                    yield offset, json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
            offset += len(line)


def read_line_at(path: str | os.PathLike, offset: int) -> dict:
    """The JSON row of the log line at `offset` (found by `iter_log`)."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        return json.loads(fh.readline())


def append_log(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows in one write, flushed to disk: a kill loses this call's rows or none of them (a cut line
    is skipped by `read_log`). A cut last line left by an earlier kill is ended first."""
    path = Path(path)
    text = jsonl_text(rows)
    with open(path, "a+b") as fh:
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                text = "\n" + text
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
