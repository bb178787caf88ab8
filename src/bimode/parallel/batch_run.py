"""One run of numbered batches, as `bimode curate` and `bimode eval` make it (docs/cluster.md).

The command cuts its rows into batches of a fixed size as it reads them, numbered in input order (`chunked`): the
unit of resume, of a Ray actor's work and of sharding. Batches are handed out as they are cut, so the driver holds
the batches in flight, not the input. `BatchRun.begin` refuses an output folder that holds another run
(`bimode.parallel.shards.check_resumable`) and, for a shard, writes its manifest, unfinished; `run` hands the
batches still to do to a pool (`bimode.parallel.pool`) and gives each result, as it comes, to the command's `write`,
which logs it at once, so a run cut off midway keeps every finished batch; `finish` marks a shard's manifest
finished, with the number of batches the whole run has (known once the input is read). What a batch holds, how it
runs, how it is logged and what counts as done stay the command's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from bimode.parallel.shards import Shard, check_resumable, fingerprint, write_manifest


def chunked(rows: Iterable, size: int) -> Iterator[list]:
    """`rows` in batches of `size`, in order (the last may be shorter), each as soon as it is full."""
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Progress:
    """The progress bar of a run, in `unit`s (queries, samples): `total` where it is known beforehand (about: rows
    found bad or repeated as the input streams by are counted as they are met), else a count and a rate."""

    def __init__(self, desc: str, unit: str, total: int | None = None, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def advance(self, units: int) -> None:
        if self.bar is not None and units:
            self.bar.update(units)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.total is not None and self.bar.n != self.bar.total:
                self.bar.total = self.bar.n  # the estimate was off: end at what was done
                self.bar.refresh()
            self.bar.close()


@dataclass(frozen=True)
class BatchRun:
    """A run of numbered batches into `out`, or the batches of it that `shard` owns."""

    out: Path
    kind: str  # the command, as the shard manifest names it: "curate" or "eval"
    shard: Shard = Shard()
    run_id: str | None = None  # a shard's fingerprint: what tells shards of one run from another's
    identity: dict = field(default_factory=dict)  # JSON-able: the models' specs, kept in the manifest

    @classmethod
    def begin(cls, out: Path, kind: str, log_name: str, shard: Shard, settings: dict,
              inputs: list, identity: dict | None = None) -> BatchRun:
        """Check that `out` may hold this run (its resume log is `log_name`) and, for a shard, write its manifest.
        `settings` (JSON-able: what decides the output), `identity` and the contents of the `inputs` files make the
        fingerprint."""
        identity = identity or {}
        run_id = None if shard.whole else fingerprint({**settings, **identity}, inputs)
        check_resumable(out, shard, run_id, log_name)
        run = cls(Path(out), kind, shard, run_id, identity)
        run._write_manifest(num_batches=None, finished=False)
        return run

    def owns(self, batch_index: int) -> bool:
        return self.shard.owns(batch_index)

    def run(self, pool, work: Iterable[tuple[int, Any]], write: Callable[[int, Any], int],
            progress: Progress) -> None:
        """Each (batch index, payload) of `work` through `pool`, as `work` yields them; `write(index, result)` logs
        a finished batch and returns how many progress units it made."""
        try:
            for index, result in pool.imap(work):
                progress.advance(write(index, result))
        finally:  # also when a batch fails: the error then starts a line of its own
            progress.close()

    def finish(self, num_batches: int, **extra) -> None:
        """A shard's manifest marked finished, with the whole run's batch count and `extra` (JSON-able) for
        `merge`."""
        self._write_manifest(num_batches=num_batches, finished=True, **extra)

    def _write_manifest(self, num_batches: int | None, finished: bool, **extra) -> None:
        if not self.shard.whole:
            write_manifest(self.out, self.kind, self.shard, self.run_id, num_batches, finished=finished,
                           identity=self.identity, **extra)
