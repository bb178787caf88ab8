"""Keys a streaming run has met, kept on disk: the driver of `bimode curate` and `bimode eval` reads its inputs as a
stream, and what it must remember per row (an id met before, a question's hash, a finished sample) goes to a SQLite
file instead of the driver's memory, so memory stays flat from a thousand rows to R-4B's 16.3 million
(bench/driver_memory.py measures it).

The file is scratch: a run builds it afresh from its inputs (reading is cheap beside the model's work), so a resumed
run decides every row as the uninterrupted run did, and it is deleted when the run ends. Nothing in it is made
durable (no journal, no fsync): a crash loses the index, never a result.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

CACHE_KIB = 64 * 1024  # SQLite's page cache: what the index may hold in memory, whatever its size on disk
COMMIT_EVERY = 1 << 16  # writes per transaction: one per write is slow, one for the run keeps dirty pages in memory


def key64(*parts: str | bytes) -> int:
    """A signed 64-bit hash of `parts` (SQLite's INTEGER), the same in every process (Python's hash is salted)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return int.from_bytes(digest.digest(), "little", signed=True)


class DiskIndex:
    """Tables of (integer key -> values) in one scratch SQLite file; `path` None keeps it in memory (small runs,
    tests). `tables` maps a table's name to its value columns."""

    def __init__(self, path: str | Path | None, tables: dict[str, tuple[str, ...]] | None = None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)  # built afresh by each run: see the module docstring
        self.db = sqlite3.connect(":memory:" if self.path is None else str(self.path), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("BEGIN")  # SQLite would commit per statement otherwise
        self.writes = 0
        self.columns: dict[str, tuple[str, ...]] = {}
        for name, values in (tables or {}).items():
            self.table(name, values)

    def table(self, name: str, values: tuple[str, ...] = ()) -> None:
        """A table of (key -> `values`), made unless it is there."""
        if name not in self.columns:
            self.columns[name] = tuple(values)
            self.db.execute(f"CREATE TABLE {name} ({', '.join(('k INTEGER PRIMARY KEY',) + tuple(values))})")

    def get(self, table: str, key: int) -> tuple | None:
        """The key's values (an empty tuple for a table of keys alone), or None when it is not there."""
        row = self.db.execute(f"SELECT {', '.join(('k',) + self.columns[table])} FROM {table} WHERE k = ?",
                              (key,)).fetchone()
        return None if row is None else row[1:]

    def values_of(self, table: str, keys: list[int]) -> list:
        """The first value of each of `keys` that is there, each once, sorted."""
        if not keys:
            return []
        found = self.db.execute(f"SELECT DISTINCT {self.columns[table][0]} FROM {table} WHERE k IN "
                                f"({', '.join('?' * len(keys))})", keys).fetchall()
        return sorted(row[0] for row in found)

    def has(self, table: str, key: int) -> bool:
        return self.db.execute(f"SELECT 1 FROM {table} WHERE k = ?", (key,)).fetchone() is not None

    def put(self, table: str, key: int, *values) -> None:
        """Set `key`'s values (a key already there keeps its first values)."""
        self.write(f"INSERT OR IGNORE INTO {table} VALUES ({', '.join('?' * (len(values) + 1))})", (key, *values))

    def put_many(self, table: str, rows: Iterable[tuple]) -> None:
        marks = ", ".join("?" * (len(self.columns[table]) + 1))
        self.db.executemany(f"INSERT OR IGNORE INTO {table} VALUES ({marks})", rows)
        self._count_write()

    def write(self, statement: str, values: tuple = ()) -> None:
        """A statement that changes the index (committed in groups)."""
        self.db.execute(statement, values)
        self._count_write()

    def _count_write(self) -> None:
        self.writes += 1
        if self.writes % COMMIT_EVERY == 0:
            self.db.execute("COMMIT")
            self.db.execute("BEGIN")

    def ordered(self, table: str) -> Iterator[tuple]:
        """(key, *values) of every row, by key."""
        return self.db.execute(f"SELECT {', '.join(('k',) + self.columns[table])} FROM {table} ORDER BY k")

    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def close(self) -> None:
        self.db.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DiskIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
