"""Prometheus metrics of `bimode serve` (`GET /metrics`), one registry per app so several apps can live in
one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bimode_requests", "answered /v1 requests by HTTP status (errors included)", ["status"], registry=r)
        self.prompt_tokens = Counter("bimode_prompt_tokens", "prompt tokens served", registry=r)
        self.completion_tokens = Counter("bimode_completion_tokens", "generated tokens", registry=r)
        self.reasoning_tokens = Counter("bimode_reasoning_tokens",
                                        "generated thinking tokens (docs/tokens.md)", registry=r)
        self.completions = Counter("bimode_completions", "completions by the mode they took (think, no_think, "
                                   "malformed): the thinking rate is think over all", ["mode"], registry=r)
        self.latency = Histogram("bimode_request_latency_seconds", "time from request to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("bimode_queue_seconds", "time a request waited before its batch started",
                                    buckets=LATENCY_BUCKETS, registry=r)

    def served(self, prompt_tokens: int, completions, seconds: float) -> None:
        self.requests.labels(status="200").inc()  # errors: failed()
        self.prompt_tokens.inc(prompt_tokens)
        for c in completions:
            self.completion_tokens.inc(c.num_tokens)
            self.reasoning_tokens.inc(c.thinking_tokens)
            self.completions.labels(mode=c.split.mode).inc()
        self.latency.observe(seconds)

    def failed(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
