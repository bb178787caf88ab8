"""Ending the processes of a launch (`accelerate launch`) cleanly, even when the teardown hangs."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)


def end_processes(trainer, teardown_s: float = 60.0) -> None:
    """Meet the other ranks, then tear the process group down before exit.

    Under `accelerate launch` on gloo a rank left with a live group sometimes aborts at interpreter exit
    ("terminate called without an active exception"), failing a launch whose training had finished; and the
    teardown itself sometimes never returns (pytorch/pytorch#75097; seen once here in about 30 CPU launches).
    Every rank has passed the barrier and the outputs are saved by then, so a teardown that outlives
    `teardown_s` is abandoned: the process exits at once, without running the interpreter's finalizers."""
    trainer.accelerator.wait_for_everyone()
    if not returns_within(trainer.accelerator.end_training, teardown_s):
        log.warning("the process-group teardown did not return within %.0f s; exiting without it", teardown_s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def returns_within(fn, seconds: float) -> bool:
    """Run fn in a daemon thread: False if it is still running after `seconds`; its exception is re-raised."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False
    if errors:
        raise errors[0]
    return True
