"""One run of numbered batches, as `bimode curate` and `bimode eval` make it (docs/cluster.md).

The command cuts its rows into batches of a fixed size, numbered in input order (`cut`): the unit of resume, of a
Ray actor's work and of sharding. `BatchRun.begin` refuses an output folder that holds another run
(`bimode.parallel.shards.check_resumable`) and, for a shard, writes its manifest, unfinished; `run` hands the
batches still to do to a pool (`bimode.parallel.pool`) and gives each result, as it comes, to the command's `write`,
which logs it at once, so a run cut off midway keeps every finished batch; `finish` marks a shard's manifest
finished. What a batch holds, how it runs, how it is logged and what counts as done stay the command's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from bimode.parallel.shards import Shard, check_resumable, fingerprint, write_manifest


def cut(rows: list, size: int) -> list[list]:
    """`rows` in batches of `size`, in order (the last may be shorter)."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


@dataclass(frozen=True)
class Progress:
    """The progress bar of a run: `total` units (queries, samples), `done` of them finished by an earlier run."""

    desc: str
    unit: str
    total: int
    done: int = 0


@dataclass(frozen=True)
class BatchRun:
    """A run of `num_batches` batches into `out`, or the batches of it that `shard` owns."""

    out: Path
    kind: str  # the command, as the shard manifest names it: "curate" or "eval"
    num_batches: int
    shard: Shard = Shard()
    run_id: str | None = None  # a shard's fingerprint: what tells shards of one run from another's
    identity: dict = field(default_factory=dict)  # JSON-able: the models' specs, kept in the manifest

    @classmethod
    def begin(cls, out: Path, kind: str, log_name: str, num_batches: int, shard: Shard, settings: dict,
              inputs: list, identity: dict | None = None) -> BatchRun:
        """Check that `out` may hold this run (its resume log is `log_name`) and, for a shard, write its manifest.
        `settings` (JSON-able: what decides the output), `identity` and the contents of the `inputs` files make the
        fingerprint."""
        identity = identity or {}
        run_id = None if shard.whole else fingerprint({**settings, **identity}, inputs)
        check_resumable(out, shard, run_id, log_name)
        run = cls(Path(out), kind, num_batches, shard, run_id, identity)
        run._write_manifest(finished=False)
        return run

    def owns(self, batch_index: int) -> bool:
        return self.shard.owns(batch_index)

    def run(self, pool, work: Iterable[tuple[int, Any]], write: Callable[[int, Any], int],
            progress: Progress | None = None) -> None:
        """Each (batch index, payload) of `work` through `pool`; `write(index, result)` logs a finished batch and
        returns how many progress units it made."""
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=progress.total, desc=progress.desc, unit=progress.unit)
            if progress.done:
                bar.update(progress.done)
        try:
            for index, result in pool.imap(work):
                units = write(index, result)
                if bar:
                    bar.update(units)
        finally:  # also when a batch fails: the error then starts a line of its own
            if bar:
                bar.close()

    def finish(self, **extra) -> None:
        """A shard's manifest marked finished, with `extra` (JSON-able) for `merge`."""
        self._write_manifest(finished=True, **extra)

    def _write_manifest(self, finished: bool, **extra) -> None:
        if not self.shard.whole:
            write_manifest(self.out, self.kind, self.shard, self.run_id, self.num_batches, finished=finished,
                           identity=self.identity, **extra)
