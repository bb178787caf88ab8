"""How `bimode serve` answers one chat request, apart from the routes (as vLLM's OpenAIServingChat).

A request is admitted (a place among the waiting ones, 503 with Retry-After past `max_queued_requests`), its body
read within `max_request_bytes` and `body_timeout_s` and prepared in a worker thread (parsed, its prompt rendered
and counted, its images tried on the model's processor), then queued for the engine's worker thread
(serve/batcher.py). Its answer is either one response (`complete`) or server-sent events as tokens come
(`stream`); both stop generating for a client that goes away, a deadline that passes or a server that drains.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.concurrency import run_in_threadpool

from bimode.generation.types import Completion, Prompt, SamplingParams
from bimode.serve import responses
from bimode.serve.batcher import Batcher, Job, QueueFull
from bimode.serve.body import read_json
from bimode.serve.drain import SHUTTING_DOWN, Drain
from bimode.serve.errors import BadRequest, error_response, server_failure
from bimode.serve.limits import ServerLimits
from bimode.serve.metrics import ServerMetrics
from bimode.serve.requests import parse_request
from bimode.serve.stream_events import DONE, StreamEvents

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 tells the client to wait
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}
POLL_S = 0.1  # how often a waiting request looks at its client and its deadline


@dataclass
class Prepared:
    """A request ready for the engine: what `parse_request` made of it, and its prompt's length in tokens."""

    prompt: Prompt
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage
    prompt_tokens: int


class StreamEnded(Exception):
    """A stream stops early with an error event: its deadline passed (504) or the server drains (503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ChatService:
    """Serves /v1/chat/completions for one app; `limits` are complete (limits.resolve_limits, engine_limits)."""

    def __init__(self, engine, model_name: str, limits: ServerLimits, batcher: Batcher, metrics: ServerMetrics,
                 drain: Drain, body_timeout_s: float):
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self.batcher, self.metrics, self.drain, self.body_timeout_s = batcher, metrics, drain, body_timeout_s
        # The server's own copy: a fast tokenizer is not safe to share between threads while one of them changes
        # its padding (the engine's batches do, for every batch); sharing it failed batches now and then
        # ("generation failed" under concurrent traffic) when request threads counted prompt tokens meanwhile.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.image_processor = getattr(getattr(engine, "processor", None), "image_processor", None)

    def error(self, status: int, message: str, param: str | None = None, code: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        """An error response, counted in the metrics."""
        self.metrics.failed(status)
        return error_response(status, message, param, code, headers)

    def timed_out(self) -> JSONResponse:
        return self.error(504, f"the request took longer than {self.limits.request_timeout:g} s (--request_timeout)")

    async def chat(self, request: Request) -> Response:
        """The answer to one /v1/chat/completions request."""
        arrived = time.monotonic()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            ticket = self.batcher.admit()
        except QueueFull as exc:
            return self.error(503, f"the server is busy: {exc}; retry later", headers=RETRY_AFTER)
        try:
            prepared = await self.receive(request)
        except Exception as exc:  # the place goes back whatever went wrong before the job holds it
            ticket.release()
            return self.refusal(exc, request_id)
        except BaseException:
            ticket.release()
            raise
        loop = asyncio.get_running_loop()
        job = Job(prepared.prompt, prepared.params, loop, loop.create_future(),
                  deadline=arrived + self.limits.request_timeout,
                  tokens=asyncio.Queue() if prepared.stream else None, ticket=ticket, request_id=request_id)
        self.batcher.submit(job)
        created = int(time.time())
        if prepared.stream:
            return StreamingResponse(self.stream(job, prepared, created), media_type="text/event-stream")
        return await self.complete(request, job, prepared, created)

    async def receive(self, request: Request) -> Prepared:
        """The request's body, read within its size and time limits and prepared in a worker thread; the parsed
        JSON (base64 images and all) is not kept while the request waits."""
        body = await asyncio.wait_for(read_json(request, self.limits.max_request_bytes), self.body_timeout_s)
        return await run_in_threadpool(self.prepare, body)

    def refusal(self, exc: Exception, request_id: str) -> JSONResponse:
        """The answer to a request that failed before reaching the engine."""
        if isinstance(exc, asyncio.TimeoutError):
            return self.error(408, f"the request body took longer than {self.body_timeout_s:g} s to arrive")
        if isinstance(exc, BadRequest):
            return self.error(exc.status, str(exc), exc.param, exc.code)
        # a bug, not the client's error: logged with its traceback, a generic answer
        log.error("request %s failed before generation", request_id, exc_info=exc)
        return self.error(500, server_failure("internal error", request_id))

    def prepare(self, body) -> Prepared:
        """Worker thread: the request parsed and checked against the model (BadRequest for the client's errors)."""
        prompt, params, stream, extras = parse_request(body, self.limits, self.model_name)
        prompt_tokens = self.prompt_tokens(prompt)
        self.check_images(prompt)
        if prompt_tokens > self.limits.max_model_len:
            raise BadRequest(f"the prompt has {prompt_tokens} tokens, over the limit of {self.limits.max_model_len}",
                             "messages")
        return Prepared(prompt, params, stream, bool(extras.get("include_usage")), prompt_tokens)

    def prompt_tokens(self, prompt: Prompt) -> int:
        try:
            text = self.engine.render(prompt)
            tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        except (ValueError, TypeError, TemplateError) as exc:  # the model's template refused the conversation
            raise BadRequest(f"the chat template cannot render these messages: {exc}", "messages") from None
        return tokens + len(prompt.images) * self.limits.image_tokens

    def check_images(self, prompt: Prompt) -> None:
        """What the model's processor refuses (Qwen-VL: extreme aspect ratios) fails here, not its batch."""
        if prompt.images and self.image_processor is not None:
            try:
                self.image_processor(images=prompt.images, return_tensors="pt")
            except (ValueError, TypeError) as exc:
                raise BadRequest(f"the model's image processor refuses an image: {exc}", "messages") from None

    async def complete(self, request: Request, job: Job, prepared: Prepared, created: int) -> Response:
        """The whole answer at once, when generation ends."""
        stopped = await self.wait(request, job)
        if stopped is not None:
            return stopped
        if job.future.cancelled() or job.expired:
            return self.timed_out()
        try:
            completions = job.future.result()
        except Exception:  # the batcher logged it with its traceback; the client learns no internals
            return self.error(500, server_failure("generation failed", job.request_id))
        self.count_served(job, prepared, completions)
        # a worker thread: log-probs of long answers are much text to build
        return await run_in_threadpool(self.reply, job, prepared, created, completions)

    async def wait(self, request: Request, job: Job) -> Response | None:
        """None once generation ends; else the job is cancelled and this is the answer: 499 for a client that
        went away (nobody to answer: the engine is freed for the others), 504 past the deadline, 503 when the
        server drains."""
        try:
            while not job.future.done():
                await asyncio.wait({job.future}, timeout=POLL_S)
                if job.future.done():
                    break
                if await request.is_disconnected():
                    job.cancel()
                    self.metrics.failed(499)
                    return Response(status_code=499)
                if job.expired:
                    job.cancel()
                    return self.timed_out()
                if self.drain.over:
                    job.cancel()
                    return self.error(503, SHUTTING_DOWN, headers=RETRY_AFTER)
        except asyncio.CancelledError:  # the server shuts down past its grace period
            job.cancel()
            raise
        return None

    def reply(self, job: Job, prepared: Prepared, created: int, completions: list[Completion]) -> JSONResponse:
        choices = [{"index": i, "message": responses.message(c), "finish_reason": responses.finish_reason(c),
                    "logprobs": responses.logprobs(self.tokenizer, c, prepared.params.logprobs),
                    "bimode": responses.decision(c)}
                   for i, c in enumerate(completions)]
        return JSONResponse({"id": job.request_id, "object": "chat.completion", "created": created,
                             "model": self.model_name, "choices": choices,
                             "usage": responses.usage(prepared.prompt_tokens, completions)})

    async def stream(self, job: Job, prepared: Prepared, created: int) -> AsyncIterator[str]:
        """The answer as server-sent events, token by token; an error event ends a stream that fails."""
        events = StreamEvents(self.tokenizer, self.model_name, job.request_id, created, job)
        finished = False
        try:
            for opening in events.opening():
                yield opening
            try:
                while not job.future.done() or not job.tokens.empty():
                    got = await self.next_token(job)
                    chunk = events.token(*got) if got is not None else None
                    if chunk:
                        yield chunk
                    if self.drain.over:  # checked per token too: a stream that never pauses must still end in time
                        raise StreamEnded(503, SHUTTING_DOWN)
                completions = self.streamed_completions(job)
            except StreamEnded as ended:
                self.metrics.failed(ended.status)
                yield events.failure(ended.status, ended.message)
                return
            for i, c in enumerate(completions):
                yield events.finish(i, c)
            self.count_served(job, prepared, completions)
            if prepared.include_usage:
                yield events.usage(responses.usage(prepared.prompt_tokens, completions))
            yield DONE
            finished = True
        finally:
            if not finished:  # the client went away, or the request failed: stop generating for it
                job.cancel()

    async def next_token(self, job: Job) -> tuple | None:
        """The next (sample index, token, log-prob) from the engine, or None when none came within POLL_S;
        StreamEnded when the deadline has passed meanwhile."""
        try:
            return await asyncio.wait_for(job.tokens.get(), timeout=POLL_S)
        except asyncio.TimeoutError:
            if job.expired:
                raise StreamEnded(504, "request timed out") from None
            return None

    def streamed_completions(self, job: Job) -> list[Completion]:
        if job.future.cancelled() or job.expired:
            raise StreamEnded(504, "request timed out")
        try:
            return job.future.result()
        except Exception:
            raise StreamEnded(500, server_failure("generation failed", job.request_id)) from None

    def count_served(self, job: Job, prepared: Prepared, completions: list[Completion]) -> None:
        self.metrics.served(prepared.prompt_tokens, completions, time.monotonic() - job.submitted)
        self.metrics.queue_time.observe((job.started or job.submitted) - job.submitted)
