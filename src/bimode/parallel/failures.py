"""An exception raised on a Ray actor, brought back to the process that runs the command and raised there as itself.

A user's mistake found on an actor (a bad row, a model directory that is not there: a `bimode.errors.UsageError`)
then reads as the one-process run's: one `error:` line, exit 2; anything else is a bug and shows the actor's
traceback (chained as the cause) and exits 1, as it would in one process. An exception that cannot travel (it does
not pickle, or its type is not importable here) comes back as a UsageError of the same words, or a `WorkerFailed`
naming its type.
"""

from __future__ import annotations

import os
import pickle
import traceback
from dataclasses import dataclass
from typing import NoReturn

from bimode.errors import UsageError


class WorkerFailed(RuntimeError):
    """A batch failed on a Ray actor with an exception that could not come back, or Ray itself failed (an actor that
    died, a lost node): not the user's mistake."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised on a Ray actor, shown as the cause of the same exception raised here."""


@dataclass(frozen=True)
class Failure:
    """An exception raised on an actor, as it travels to the driver (picklable whatever the exception holds)."""

    exception: bytes | None  # the exception pickled, when it comes back unpickled as it was
    user_error: bool
    message: str
    type_name: str
    traceback: str
    pid: int

    @classmethod
    def of(cls, exc: Exception) -> Failure:
        try:
            carried = pickle.dumps(exc)
            pickle.loads(carried)  # an exception whose __init__ needs more than its args cannot be rebuilt
        except Exception:  # noqa: BLE001 - any exception that does not round-trip comes back by its words
            carried = None
        return cls(carried, isinstance(exc, UsageError), str(exc), type(exc).__name__,
                   "".join(traceback.format_exception(exc)), os.getpid())

    def raise_here(self, batch_index: int) -> NoReturn:
        """Raise in the driver what the actor raised for this batch, its cause the actor's traceback."""
        where = f"batch {batch_index} failed on a Ray worker (pid {self.pid})"
        exc = None
        if self.exception is not None:
            try:
                exc = pickle.loads(self.exception)
            except Exception:  # noqa: BLE001 - its type's module is on the actor's node only (vLLM on GPU nodes)
                pass
        if exc is None:
            exc = UsageError(self.message) if self.user_error else \
                WorkerFailed(f"{where}: {self.type_name}: {self.message}")
        raise exc from RemoteTraceback(f"{where}:\n{self.traceback}")
