"""Python's standard library: what bimode relies on beyond its public API (docs/internals.md).

- `concurrent.futures.ProcessPoolExecutor._processes` (pid -> `multiprocessing.Process`): the pool's worker
  processes. `shutdown` neither stops nor kills a running call, and a math check stuck in a C-level big-number
  computation runs until it has taken all memory, so the answer checker kills its worker after a timeout.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor


def kill_pool_processes(pool: ProcessPoolExecutor) -> None:
    """Kill every worker process of `pool` now (its running calls never return; shut the pool down after)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
