"""Graceful shutdown's end, as the app sees it (started by `serve` on SIGTERM)."""

from __future__ import annotations

import time

SHUTTING_DOWN = "the server is shutting down; retry on another replica or later"


class Drain:
    """Once `until` is set, requests still waiting or generating at that time stop and answer 503 (Retry-After)
    instead of being cut off by the server with a 500."""

    def __init__(self):
        self.until: float | None = None

    def start(self, grace_s: float) -> None:
        if self.until is None:
            self.until = time.monotonic() + grace_s

    @property
    def over(self) -> bool:
        return self.until is not None and time.monotonic() >= self.until
