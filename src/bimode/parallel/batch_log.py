"""Where each finished batch of a resume log is, kept on disk: a curation log holds every curated row, so the driver
remembers a batch by its place in the file and a hash of its ids, not by its rows.

`BatchLog.scan` reads a log once (one or more files: a shard's, or every shard's for `merge`) and keeps, per batch,
the file, the byte offset of its line and the hash of its ids; a batch logged twice (a resumed run that redid a
batch half-written by a kill) keeps its last line, as reading the whole log would. `entries` reads the lines back in
batch order, one at a time (scan again after the run to index the batches it logged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from bimode.disk_index import DiskIndex, key64
from bimode.io import iter_log, read_line_at

TABLES = {"batches": ("file", "offset", "ids")}


def ids_hash(ids: list[str]) -> int:
    return key64(*ids)


class BatchLog:
    def __init__(self, index: DiskIndex):
        self.index = index
        self.files: list[Path] = []
        index.table("batches", TABLES["batches"])

    def scan(self, path: str | Path, owns=lambda batch: True) -> None:
        """Index the finished batches of the log at `path`; `owns(batch)` False for one raises ValueError."""
        file_number = len(self.files)
        self.files.append(Path(path))
        for offset, entry in iter_log(path):
            batch = entry["batch"]
            if not owns(batch):
                raise ValueError(f"batch {batch}")
            self.index.write("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)",
                             (batch, file_number, offset, ids_hash(entry["ids"])))

    def ids_hash(self, batch: int) -> int | None:
        """The hash of a finished batch's ids, or None when it is not finished."""
        found = self.index.get("batches", batch)
        return None if found is None else found[2]

    def numbers(self) -> set[int]:
        """The finished batches' numbers (a set as large as the batch count: for `merge`'s check)."""
        return {row[0] for row in self.index.db.execute("SELECT k FROM batches")}

    def last(self) -> int | None:
        """The highest finished batch number, or None when none is."""
        return self.index.db.execute("SELECT MAX(k) FROM batches").fetchone()[0]

    def entries(self) -> Iterator[dict]:
        """The scanned batches' log entries, in batch order."""
        for _, file_number, offset, _ in self.index.ordered("batches"):
            yield read_line_at(self.files[file_number], offset)

