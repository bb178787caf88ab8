"""Several OpenAI-compatible servers of one model as one backend (`--annotator URL1 URL2 ...`).

Requests (one per prompt and mode) go to the endpoints in turn. An endpoint that stops answering (connection
refused, timeouts, 5xx after its own retries: `EndpointUnavailable`) is set aside for `rest_s` seconds and its
request goes to the next one; a request fails only when it has tried every endpoint (resting ones last). Pooled
endpoints retry once themselves (`build_backend` sets it), so a dead one costs a request two timeouts at most. A 4xx answer is the request's fault,
not the server's, and fails at once. Each request carries its prompt's seed (bimode.seeds), so with servers of
the same model and version the answer does not depend on which server gave it.
"""

from __future__ import annotations

import logging
import threading
import time

from bimode.generation.openai_backend import EndpointError, EndpointUnavailable, generate_by_requests
from bimode.generation.types import Completion, Prompt, SamplingParams, TokenCallback
from bimode.modes import ThinkingMode

log = logging.getLogger(__name__)


class EndpointPool:
    def __init__(self, endpoints: list, rest_s: float = 60.0):
        if not endpoints:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.rest_s = rest_s
        self.tokenizer = self.endpoints[0].tokenizer
        self.model = self.endpoints[0].model
        self.concurrency = sum(e.concurrency for e in self.endpoints)
        self._lock = threading.Lock()
        self._next = 0
        self._resting_until = [0.0] * len(self.endpoints)
        self._last_failure = ["resting"] * len(self.endpoints)

    @property
    def base_urls(self) -> list[str]:
        return [e.base_url for e in self.endpoints]

    def resting_until(self, base_url: str) -> float:
        """When the endpoint at `base_url` is tried first again (`time.monotonic()`; 0.0: it never failed)."""
        with self._lock:
            return self._resting_until[self.base_urls.index(base_url)]

    def end_rests(self) -> None:
        """Every endpoint is awake again: the next requests try them all in turn."""
        with self._lock:
            self._resting_until = [0.0] * len(self.endpoints)

    def render(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> str:
        return self.endpoints[0].render(prompt, mode)

    def generate(self, prompts: list[Prompt], params: SamplingParams = SamplingParams(),
                 on_token: TokenCallback | None = None, progress: bool = False) -> list[list[Completion]]:
        """As OpenAIEndpointBackend.generate, each request sent to the next endpoint that answers."""
        return generate_by_requests(self._send, self.concurrency, self.tokenizer, prompts, params, on_token, progress)

    def _pick(self, tried: set[int]) -> int | None:
        """The next endpoint this request has not tried: in turn among those not resting, else the one whose rest
        ends first (a request fails only once it has tried them all)."""
        with self._lock:
            now = time.monotonic()
            untried = [(self._next + step) % len(self.endpoints) for step in range(len(self.endpoints))]
            untried = [i for i in untried if i not in tried]
            if not untried:
                return None
            awake = [i for i in untried if self._resting_until[i] <= now]
            i = awake[0] if awake else min(untried, key=lambda j: self._resting_until[j])
            self._next = i + 1
            return i

    def _send(self, prompt: Prompt, mode: ThinkingMode, n: int, params: SamplingParams) -> list[Completion]:
        tried: set[int] = set()
        while (i := self._pick(tried)) is not None:
            tried.add(i)
            try:
                return self.endpoints[i]._request(prompt, mode, n, params)
            except EndpointUnavailable as exc:
                with self._lock:
                    self._resting_until[i] = time.monotonic() + self.rest_s
                    self._last_failure[i] = str(exc)
                log.warning("%s stopped answering (%s); its requests go to the other endpoints for %.0f s",
                            self.endpoints[i].base_url, exc, self.rest_s)
        with self._lock:
            failures = list(self._last_failure)
        raise EndpointError("no endpoint answered: " + "; ".join(
            f"{e.base_url}: {why.removeprefix(e.base_url + ': ')}" for e, why in zip(self.endpoints, failures)))
