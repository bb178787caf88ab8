"""`bimode serve`: an OpenAI-compatible chat server over the generation engine.

One worker thread owns the engine and runs requests in batches (serve/batcher.py). Reasoning is returned apart
from the answer (as `reasoning` and `reasoning_content`, vLLM's new and old names), split by bimode.streaming in
both the streamed and the plain response, so the two agree for the same tokens; usage's reasoning_tokens are the
completions' thinking_tokens (generation.types.token_counts, docs/tokens.md).

What one request may cost is bounded, and the event loop never waits on it: the body is read within
`max_request_bytes` (413 past it) and parsed in a worker thread, a prompt that cannot fit is refused from its
length before it is tokenized, tokenizing and image decoding run in worker threads, at most `max_queued_requests`
wait for the engine (503 with Retry-After past it), and a request whose deadline passes or whose client goes away
stops generating at the engine's next step. Every field of a request is honoured or refused (serve/requests.py).
docs/serving_and_eval.md has the limits and what a hostile-traffic test measured.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from bimode.generation.defaults import default_max_new_tokens
from bimode.modes import ThinkingMode
from bimode.serve import responses
from bimode.serve.batcher import Batcher, Job, QueueFull
from bimode.serve.body import read_json
from bimode.serve.metrics import ServerMetrics
from bimode.serve.requests import MODEL_MODES, BadRequest, ServerLimits, parse_request
from bimode.streaming import ResponseStream

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 tells the client to wait
POLL_S = 0.1  # how often a waiting request looks at its client and its deadline
BODY_TIMEOUT_S = 30.0  # to send the whole body: a client that trickles it holds a place among the waiting ones


def resolve_limits(limits: ServerLimits, engine) -> ServerLimits:
    """The limits with `default_new_tokens` filled in: the model's own limit, else 8,192, within the cap."""
    if limits.default_new_tokens is not None:
        return limits
    return replace(limits, default_new_tokens=min(default_max_new_tokens(engine), limits.max_tokens))


def engine_limits(limits: ServerLimits, engine) -> ServerLimits:
    """The limits that come from the engine: the longest text one token can stand for (from the tokenizer's
    vocabulary), the tokens an image takes, whether the engine shares prefixes (budget and log-probs), and the
    prompt limit when none is set (the engine's context length, else 32,768)."""
    tokenizer = engine.tokenizer
    longest = max((len(tokenizer.decode([i], skip_special_tokens=False)) for i in range(len(tokenizer))), default=1)
    return replace(limits, max_token_chars=max(1, longest), image_tokens=engine.image_tokens,
                   shared_prefix=bool(getattr(engine, "shared_prefix", True)),
                   max_model_len=limits.max_model_len or getattr(engine, "context_length", None) or 32768)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code or status}})


class RequireKey:
    """ASGI middleware: every /v1 request needs `Authorization: Bearer <key>` (401 without); /health and /metrics
    stay open, as in vLLM. Plain ASGI, so streamed responses and client disconnects pass through untouched."""

    def __init__(self, app, key: str, metrics: ServerMetrics):
        self.app, self.key, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")  # bytes: compare_digest refuses non-ASCII str
            if not hmac.compare_digest(given, self.key):
                self.metrics.failed(401)
                response = error_response(401, "missing or wrong API key (send Authorization: Bearer <key>)")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Drain:
    """Graceful shutdown's end, as the app sees it: once `until` is set, requests still waiting or generating at
    that time stop and answer 503 (Retry-After) instead of being cut off by the server with a 500."""

    def __init__(self):
        self.until: float | None = None

    def start(self, grace_s: float) -> None:
        if self.until is None:
            self.until = time.monotonic() + grace_s

    @property
    def over(self) -> bool:
        return self.until is not None and time.monotonic() >= self.until


SHUTTING_DOWN = "the server is shutting down; retry on another replica or later"


def server_failure(what: str, request_id: str) -> str:
    """A 500's message: what failed and the request id the server's log names, nothing of the internals."""
    return f"{what} (request {request_id}; the server's log has the details)"


def create_app(engine, model_name: str, limits: ServerLimits = ServerLimits(), api_key: str | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S):
    """The app. With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`. `app.state.drain`
    (Drain) is started by `serve` on SIGTERM."""
    app = FastAPI(title="bimode", description="OpenAI-compatible auto-thinking VLM server")
    drain = app.state.drain = Drain()
    metrics = ServerMetrics()
    limits = engine_limits(resolve_limits(limits, engine), engine)
    # The server's own copy: a fast tokenizer is not safe to share between threads while one of them changes its
    # padding (the engine's batches do, for every batch); sharing it failed batches now and then ("generation
    # failed" under concurrent traffic) when request threads counted prompt tokens meanwhile.
    tokenizer = copy.deepcopy(engine.tokenizer)
    batcher = Batcher(engine, max_batch=limits.max_batch, max_queued=limits.max_queued_requests)
    if api_key:
        app.add_middleware(RequireKey, key=api_key, metrics=metrics)

    def error(status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        metrics.failed(status)
        return error_response(status, message, param, code, headers)

    image_processor = getattr(getattr(engine, "processor", None), "image_processor", None)

    def prompt_tokens_of(prompt) -> int:
        text = engine.render(prompt)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + len(prompt.images) * limits.image_tokens

    def prepare(body):
        """Worker thread: the request's prompt, params and prompt length (BadRequest for the client's errors)."""
        prompt, params, stream, extras = parse_request(body, limits, model_name)
        try:
            prompt_tokens = prompt_tokens_of(prompt)
        except (ValueError, TypeError, TemplateError) as exc:  # the model's template refused the conversation
            raise BadRequest(f"the chat template cannot render these messages: {exc}", "messages") from None
        if prompt.images and image_processor is not None:
            try:  # what the model's processor refuses (Qwen-VL: extreme aspect ratios) fails here, not its batch
                image_processor(images=prompt.images, return_tensors="pt")
            except (ValueError, TypeError) as exc:
                raise BadRequest(f"the model's image processor refuses an image: {exc}", "messages") from None
        if prompt_tokens > limits.max_model_len:
            raise BadRequest(f"the prompt has {prompt_tokens} tokens, over the limit of {limits.max_model_len}",
                             "messages")
        return prompt, params, stream, extras, prompt_tokens

    # async: answered on the event loop, never queued behind the worker threads that parse and tokenize requests
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        # NAME:auto, NAME:think, NAME:no_think force a mode for clients that cannot send chat_template_kwargs
        names = [model_name] + [model_name + suffix for suffix in MODEL_MODES]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "bimode"}
                                           for name in names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.monotonic()
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            ticket = batcher.admit()
        except QueueFull as exc:
            return error(503, f"the server is busy: {exc}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})
        try:
            body = await asyncio.wait_for(read_json(request, limits.max_request_bytes), body_timeout_s)
            prompt, params, stream, extras, prompt_tokens = await run_in_threadpool(prepare, body)
            del body  # the parsed JSON (base64 images and all) is not kept while the request waits
        except asyncio.TimeoutError:
            ticket.release()
            return error(408, f"the request body took longer than {body_timeout_s:g} s to arrive")
        except BadRequest as exc:
            ticket.release()
            return error(exc.status, str(exc), exc.param, exc.code)
        except Exception:  # a bug, not the client's error: logged with its traceback, a generic answer
            ticket.release()
            log.exception("request %s failed before generation", request_id)
            return error(500, server_failure("internal error", request_id))
        except BaseException:
            ticket.release()
            raise
        loop = asyncio.get_running_loop()
        job = Job(prompt, params, loop, loop.create_future(), deadline=arrived + limits.request_timeout,
                  tokens=asyncio.Queue() if stream else None, ticket=ticket, request_id=request_id)
        batcher.submit(job)
        created = int(time.time())
        if stream:
            return StreamingResponse(_stream(job, request_id, created, prompt_tokens, extras),
                                     media_type="text/event-stream")
        try:
            while not job.future.done():
                await asyncio.wait({job.future}, timeout=POLL_S)
                if job.future.done():
                    break
                if await request.is_disconnected():  # nobody to answer: free the engine for the others
                    job.cancel()
                    metrics.failed(499)
                    return Response(status_code=499)
                if job.expired:
                    job.cancel()
                    return error(504, f"the request took longer than {limits.request_timeout:g} s (--request_timeout)")
                if drain.over:
                    job.cancel()
                    return error(503, SHUTTING_DOWN, headers={"Retry-After": str(RETRY_AFTER_S)})
        except asyncio.CancelledError:  # the server shuts down past its grace period
            job.cancel()
            raise
        if job.future.cancelled() or job.expired:
            return error(504, f"the request took longer than {limits.request_timeout:g} s (--request_timeout)")
        try:
            completions = job.future.result()
        except Exception:  # the batcher logged it with its traceback; the client learns no internals
            return error(500, server_failure("generation failed", request_id))
        metrics.served(prompt_tokens, completions, time.monotonic() - job.submitted)
        metrics.queue_time.observe((job.started or job.submitted) - job.submitted)

        def reply() -> JSONResponse:  # a worker thread: log-probs of long answers are much text to build
            choices = []
            for i, c in enumerate(completions):
                choices.append({"index": i, "message": responses.message(c),
                                "finish_reason": responses.finish_reason(c),
                                "logprobs": responses.logprobs(tokenizer, c, params.logprobs),
                                "bimode": {"mode": c.split.mode, "p_think": c.p_think,
                                           "budget_hit": c.finish_reason == "budget"}})
            return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                                 "model": model_name, "choices": choices,
                                 "usage": responses.usage(prompt_tokens, completions)})

        return await run_in_threadpool(reply)

    async def _stream(job: Job, request_id: str, created: int, prompt_tokens: int, extras: dict):
        n = len(job.prompt.modes)
        # With a think threshold the engine picks an auto sample's mode suffix itself: known only at the end.
        chosen = job.params.think_threshold is not None
        streams = [ResponseStream(tokenizer, None if chosen and m is ThinkingMode.AUTO else m.prompt_suffix)
                   for m in job.prompt.modes]
        unsent = [[] for _ in range(n)]  # log-prob entries of tokens whose text is not out yet

        def chunk(index: int, delta: dict, finish: str | None = None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            if job.params.logprobs:  # the entries of the tokens this chunk brings (none: null, as vLLM sends)
                choice["logprobs"] = {"content": unsent[index]} if unsent[index] else None
                unsent[index] = []
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(payload)}\n\n"

        def failure(status: int, message: str) -> str:  # an error event, then the end of the stream (as vLLM)
            metrics.failed(status)
            return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\ndata: [DONE]\n\n"

        finished = False
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            while not job.future.done() or not job.tokens.empty():
                try:
                    index, token, logprob = await asyncio.wait_for(job.tokens.get(), timeout=POLL_S)
                except asyncio.TimeoutError:
                    if job.expired:
                        yield failure(504, "request timed out")
                        return
                    if drain.over:
                        yield failure(503, SHUTTING_DOWN)
                        return
                    continue
                if logprob is not None and job.params.logprobs:
                    unsent[index].append(responses.logprob_entry(tokenizer, token, logprob))
                delta = responses.delta(streams[index].add(token))
                if delta:
                    yield chunk(index, delta)
                if drain.over:  # checked per token too: a stream that never pauses must still end in time
                    yield failure(503, SHUTTING_DOWN)
                    return
            if job.future.cancelled() or job.expired:
                yield failure(504, "request timed out")
                return
            try:
                completions = job.future.result()
            except Exception:
                yield failure(500, server_failure("generation failed", request_id))
                return
            for i, c in enumerate(completions):  # what is left: held-back text, a cut-off character
                yield chunk(i, responses.delta(streams[i].finish(c.prompt_suffix, c.text)), responses.finish_reason(c))
            metrics.served(prompt_tokens, completions, time.monotonic() - job.submitted)
            metrics.queue_time.observe((job.started or job.submitted) - job.submitted)
            if extras.get("include_usage"):
                payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": model_name, "choices": [], "usage": responses.usage(prompt_tokens, completions)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away, or the request failed: stop generating for it
                job.cancel()

    return app


def serve(cfg) -> None:
    """Serve `bimode serve`'s config (ServeConfig) until SIGTERM or Ctrl-C. SIGTERM stops accepting requests,
    lets those running finish within `cfg.shutdown_timeout` (then answers what is left with 503) and returns, so
    the process exits 0."""
    from bimode.generation.backends import local_engine

    engine = local_engine(cfg.model, trust_remote_code=cfg.trust_remote_code, max_batch_rows=cfg.max_batch)
    name = cfg.served_model_name or Path(cfg.model).name
    app = create_app(engine, name, ServerLimits.from_config(cfg),
                     api_key=cfg.api_key or os.environ.get("BIMODE_API_KEY") or None)
    run_app(app, cfg.host, cfg.port, cfg.shutdown_timeout)


def run_app(app, host: str, port: int, shutdown_timeout_s: float) -> None:
    """uvicorn on `app` until SIGTERM / SIGINT, shutting down within the grace period (see `serve`)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # the app ends what is left at the grace period's end itself
            app.state.drain.start(shutdown_timeout_s)
            super().handle_exit(sig, frame)

    # uvicorn's own cut-off (tasks cancelled, a 500 for what had no response yet) only backs the app's up
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                   timeout_graceful_shutdown=shutdown_timeout_s + 2))
    # uvicorn shuts down gracefully on SIGTERM / SIGINT, then raises the signal again under the handler it found:
    # with the defaults the process would die of it (exit status 143) or print a KeyboardInterrupt traceback
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run()
    if not server.started:  # it never served (the port was taken, ...): uvicorn has said why
        raise SystemExit(3)
