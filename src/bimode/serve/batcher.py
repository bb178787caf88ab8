"""The engine's one worker thread: batches requests, bounds the wait, and stops requests nobody waits for.

Requests with the same sampling settings that arrive together share a batch. At most `max_queued` requests wait
for the engine, counted from their arrival (`admit`, before their body is read and parsed) to the start of their
batch: beyond that `admit` raises QueueFull and the server answers 503, as vLLM and TGI do under overload, instead
of letting the queue and its memory grow. A request is cancelled when its
client goes away or its deadline passes: a waiting one never starts, a running one's samples stop at the engine's
next decoding step (`should_stop`), so its slot in the batch is freed at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import astuple, dataclass, field

from bimode.generation.types import Completion, Prompt, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are waiting for the engine."""


class Ticket:
    """One admitted request's place among the waiting ones; given back once, from whichever thread comes first
    (its batch starts, it is cancelled while waiting, or the request fails before reaching the engine)."""

    def __init__(self, batcher: "Batcher"):
        self._batcher, self._held = batcher, True

    def release(self) -> None:
        with self._batcher._lock:
            if self._held:
                self._held = False
                self._batcher._waiting -= 1


@dataclass
class Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deadline: float  # time.monotonic() after which the request has failed (504)
    tokens: asyncio.Queue | None = None  # streaming: (sample index, token id, TokenLogprob or None) as they come
    cancelled: bool = False
    emitted: bool = False  # a token went out to its stream (a failed batch is then not run again for it)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its batch began: submitted -> started is queue time
    result: list[Completion] = field(default_factory=list)
    ticket: Ticket | None = None
    request_id: str = ""  # named in the log when its generation fails

    def cancel(self) -> None:
        """Stop it: a waiting job gives its place back at once, a running one stops at the engine's next step."""
        self.cancelled = True
        if self.started is None and self.ticket is not None:
            self.ticket.release()

    @property
    def expired(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


class Batcher:
    """Collects jobs for a few milliseconds and runs those with equal sampling settings as one batch."""

    def __init__(self, engine, max_batch: int = 32, window_s: float = 0.01, max_queued: int = 64):
        self.engine, self.max_batch, self.window_s, self.max_queued = engine, max_batch, window_s, max_queued
        self.jobs: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet started or dropped
        self.thread = threading.Thread(target=self._loop, name="bimode-batcher", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    def admit(self) -> Ticket:
        """A place among the waiting requests, or QueueFull."""
        with self._lock:
            if self._waiting >= self.max_queued:
                raise QueueFull(f"{self._waiting} requests are waiting for the engine (--max_queued_requests "
                                f"{self.max_queued})")
            self._waiting += 1
        return Ticket(self)

    def submit(self, job: Job) -> None:
        """Queue an admitted job (job.ticket from `admit`)."""
        self.jobs.put(job)

    def _loop(self) -> None:
        pending: list[Job] = []
        while True:
            if not pending:
                pending.append(self.jobs.get())
            deadline = time.monotonic() + self.window_s
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            expired = [j.expired for j in pending]  # read once: a deadline may pass while we look
            dropped = [j for j, gone in zip(pending, expired) if gone]  # nobody waits for these any more
            for job in dropped:
                _call(job, job.future.cancel)
            live = [j for j, gone in zip(pending, expired) if not gone]
            key = astuple(live[0].params) if live else None
            batch = [j for j in live if astuple(j.params) == key][: self.max_batch]
            pending = [j for j in live if j not in batch]
            for job in dropped + batch:
                if job.ticket is not None:
                    job.ticket.release()  # a no-op for one its cancellation already gave back
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def on_token(prompt_index: int, sample_index: int, token: int, logprob) -> None:
            job = batch[prompt_index]
            if job.tokens is not None:
                job.emitted = True
                _call(job, job.tokens.put_nowait, (sample_index, token, logprob))

        started = time.monotonic()
        for job in batch:
            job.started = started
        try:
            results = self.engine.generate([j.prompt for j in batch], batch[0].params, on_token=on_token,
                                           should_stop=lambda i: batch[i].expired)
        except Exception as exc:  # one bad request must not fail the others, nor stop the server
            again = [j for j in batch if not j.emitted]
            ids = ", ".join(j.request_id for j in batch)
            if len(batch) > 1 and again:
                log.exception("a batch of %d requests failed (%s); running those not yet streaming one at a time",
                              len(batch), ids)
                for job in batch:
                    if job.emitted:  # its stream already has tokens: running it again would repeat them
                        _call(job, _set_exception, job.future, exc)
                for job in again:
                    self._run([job])
                return
            log.exception("generation failed (%s)", ids)
            _call(batch[0], _set_exception, batch[0].future, exc)
            return
        for job, completions in zip(batch, results):
            _call(job, _set_result, job.future, completions)


def _call(job: Job, callback, *args) -> None:
    """Run `callback(*args)` on the job's event loop; a loop already closed (the server stopped) is no error."""
    try:
        job.loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
