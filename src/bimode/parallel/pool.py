"""Where numbered batches run: in this process, or on a pool of Ray actors through Ray Data.

A pool takes (batch index, payload) items and yields (batch index, result) as batches finish, in any order; the
caller logs each result at once, so a run cut off midway keeps every finished batch. The function that turns a
payload into a result is the same in both pools: the Ray pool builds it on each actor from a picklable factory
(`make_worker()`), so each actor holds its own model or endpoint client, built once. What a batch raises on an actor
is raised here as itself (`bimode.parallel.failures`), so both pools end a run alike.
"""

from __future__ import annotations

import itertools
import os
import pickle
from typing import Any, Callable, Iterable, Iterator

from bimode.parallel.failures import Failure, WorkerFailed

Item = tuple[int, Any]
RESTARTS = 2


class LocalPool:
    """Every batch in this process, in order."""

    def __init__(self, run_batch: Callable[[Any], Any]):
        self.run_batch = run_batch

    def imap(self, items: Iterable[Item]) -> Iterator[tuple[int, Any]]:
        for index, payload in items:
            yield index, self.run_batch(payload)


class _Actor:
    """A Ray Data map_batches actor: builds the worker once, then runs one batch per call. An exception, building
    the worker or running a batch, comes back as a value (`Failure`), so the driver raises it as one process would
    (and a resumed run redoes that batch) instead of Ray restarting an actor or retrying a batch that fails the
    same way each time."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]]):
        try:
            self.run_batch, self.broken = make_worker(), None
        except Exception as exc:  # noqa: BLE001 - e.g. a model directory that is not there: every batch says so
            self.run_batch, self.broken = None, Failure.of(exc)

    def __call__(self, batch: dict) -> dict:
        results = []
        for payload in batch["payload"]:
            if self.broken:
                results.append(pickle.dumps(("error", self.broken)))
                continue
            try:
                results.append(pickle.dumps(("ok", self.run_batch(pickle.loads(payload)))))
            except Exception as exc:  # noqa: BLE001 - any failure goes back to the driver, raised there
                results.append(pickle.dumps(("error", Failure.of(exc))))
        return {"index": batch["index"], "result": results}


class RayPool:
    """Batches on `num_workers` Ray actors (one Ray Data actor pool), each holding what `make_worker` builds.

    The batches are taken from the driver's stream `window` at a time (a Ray Data dataset is built from a list):
    the driver holds one window's payloads, not the run's; each window starts its actor pool afresh (the worker is
    built again: at a thousand batches a window, seconds against the window's hours on a real model)."""

    def __init__(self, make_worker: Callable[[], Callable[[Any], Any]], address: str, num_workers: int = 1,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, window: int = 1024):
        self.make_worker, self.address, self.num_workers = make_worker, address, num_workers
        self.cpus_per_worker, self.gpus_per_worker, self.window = cpus_per_worker, gpus_per_worker, window

    def imap(self, items: Iterable[Item]) -> Iterator[tuple[int, Any]]:
        from bimode.compat.ray_api import start_or_join

        items = iter(items)
        windows = iter(lambda: list(itertools.islice(items, self.window)), [])
        first = next(windows, None)
        if not first:
            return
        needed = int(-(-self.num_workers * self.cpus_per_worker // 1))
        started = start_or_join(self.address, num_cpus=max(os.cpu_count() or 1, needed))
        try:
            for window in itertools.chain([first], windows):
                yield from self._run([{"index": index, "payload": pickle.dumps(payload)} for index, payload in window])
        finally:
            if started:
                import ray

                ray.shutdown()

    def _run(self, items: list[dict]) -> Iterator[tuple[int, Any]]:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # the command shows its own
        dataset = ray.data.from_items(items, override_num_blocks=len(items))  # a block per batch: spread evenly
        results = dataset.map_batches(
            _Actor, fn_constructor_args=(self.make_worker,), batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.num_workers), num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None,
            # an actor that dies (a lost node, out of memory) is restarted and its batch retried, a few times:
            # Ray Data's default is forever, and a batch that kills its actor each time would never end the run
            max_restarts=RESTARTS, max_task_retries=RESTARTS)
        rows, handed = iter(results.iter_rows()), set()
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - Ray's own failures (an actor that cannot start, a lost node)
                raise _ray_failure(exc, len(handed), len(items)) from exc
            index = int(row["index"])
            if index in handed:  # a batch retried after its actor died must be logged once, whatever Ray delivers
                continue
            handed.add(index)
            status, value = pickle.loads(row["result"])
            if status == "error":
                value.raise_here(index)
            yield index, value


def _ray_failure(exc: Exception, finished: int, total: int) -> WorkerFailed:
    """What stopped a Ray run, said plainly: a worker process that died past its restarts reads as that (Ray's own
    message, kept as the cause, is long, names no batch and does not say that restarts ran out)."""
    from ray.exceptions import ActorDiedError

    if isinstance(exc, ActorDiedError):
        return WorkerFailed(
            f"a Ray worker's process died (killed or crashed: out of memory, a lost node, a signal) once more than "
            f"the {RESTARTS} restarts each worker gets, each of which retried the batch it was running; {finished} "
            f"of the {total} batches handed to Ray together had come back: {type(exc).__name__}: {str(exc)[:500]}")
    return WorkerFailed(f"the Ray run failed: {type(exc).__name__}: {str(exc)[-3000:]}")
