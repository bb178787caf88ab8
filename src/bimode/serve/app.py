"""`bimode serve`: an OpenAI-compatible chat server over the generation engine.

One worker thread owns the engine and runs requests in batches (requests with the same sampling settings
that arrive together share a batch), so concurrent requests are served together without mixing outputs.
Reasoning is returned apart from the answer (as `reasoning` and `reasoning_content`, vLLM's new and old names), split by
bimode.streaming in both the streamed and the plain response, so the two agree for the same tokens; usage's
reasoning_tokens are the completions' thinking_tokens (generation.types.token_counts, docs/tokens.md).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import astuple, dataclass, field, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from bimode.generation.defaults import default_max_new_tokens
from bimode.generation.types import Completion, Prompt, SamplingParams
from bimode.modes import ThinkingMode
from bimode.serve.metrics import ServerMetrics
from bimode.serve.requests import MODEL_MODES, BadRequest, ServerLimits, parse_request
from bimode.streaming import Delta, ResponseStream


@dataclass
class _Job:
    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    tokens: asyncio.Queue | None = None  # streaming: (sample index, token id) as they come
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when its batch began: submitted -> started is queue time
    result: list[Completion] = field(default_factory=list)


class Batcher:
    """Collects jobs for a few milliseconds and runs those with equal sampling settings as one batch."""

    def __init__(self, engine, max_batch: int = 32, window_s: float = 0.01):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="bimode-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def _loop(self) -> None:
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(self.jobs.get())
            deadline = time.monotonic() + self.window_s
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            key = astuple(pending[0].params)
            batch = [j for j in pending if astuple(j.params) == key and not j.cancelled][: self.max_batch]
            pending = [j for j in pending if j not in batch and not j.cancelled]
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        def on_token(prompt_index: int, sample_index: int, token: int) -> None:
            job = batch[prompt_index]
            if job.tokens is not None:
                job.loop.call_soon_threadsafe(job.tokens.put_nowait, (sample_index, token))

        started = time.monotonic()
        for job in batch:
            job.started = started
        try:
            results = self.engine.generate([j.prompt for j in batch], batch[0].params, on_token=on_token)
        except Exception as exc:  # one bad batch must not stop the server
            for job in batch:
                job.loop.call_soon_threadsafe(_set_exception, job.future, exc)
            return
        for job, completions in zip(batch, results):
            job.loop.call_soon_threadsafe(_set_result, job.future, completions)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


def _message(completion: Completion) -> dict:
    """The assistant message. Reasoning goes out under both names: `reasoning` (vLLM since PR #27752, and the
    clients that followed) and `reasoning_content` (older vLLM and its clients); no reasoning is None."""
    split = completion.split
    reasoning = split.reasoning or None
    return {"role": "assistant", "content": split.content, "reasoning": reasoning, "reasoning_content": reasoning}


def _delta(delta: Delta) -> dict:
    out = {}
    if delta.reasoning:
        out["reasoning"] = out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    return out


def _usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    generated = sum(c.num_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
            "completion_tokens_details": {"reasoning_tokens": sum(c.thinking_tokens for c in completions)}}


def _finish(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def resolve_limits(limits: ServerLimits, engine) -> ServerLimits:
    """The limits with `default_new_tokens` filled in: the model's own limit, else 8,192, within the cap."""
    if limits.default_new_tokens is not None:
        return limits
    return replace(limits, default_new_tokens=min(default_max_new_tokens(engine), limits.max_new_tokens))


def create_app(engine, model_name: str, limits: ServerLimits = ServerLimits(), request_timeout_s: float = 300.0,
               max_batch: int = 32, api_key: str | None = None):
    """The app. With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>` (401 without);
    /health and /metrics stay open, as in vLLM."""
    app = FastAPI(title="bimode", description="OpenAI-compatible auto-thinking VLM server")
    metrics = ServerMetrics()
    limits = resolve_limits(limits, engine)
    batcher = Batcher(engine, max_batch=max_batch)
    tokenizer = engine.tokenizer
    image_tokens = engine.image_tokens

    def error(status: int, message: str, param: str | None = None):
        metrics.failed(status)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": status}})

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        # bytes: compare_digest refuses non-ASCII str, and headers arrive as latin-1
        if api_key and request.url.path.startswith("/v1") and not hmac.compare_digest(
                request.headers.get("authorization", "").encode("latin-1"), f"Bearer {api_key}".encode()):
            return error(401, "missing or wrong API key (send Authorization: Bearer <key>)")
        return await call_next(request)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def models():
        # NAME:auto, NAME:think, NAME:no_think force a mode for clients that cannot send chat_template_kwargs
        names = [model_name] + [model_name + suffix for suffix in MODEL_MODES]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "bimode"}
                                           for name in names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON")
        try:
            # parsed in a worker thread: a remote image fetch must not stall the event loop
            prompt, params, stream, extras = await run_in_threadpool(parse_request, body, limits)
            text = engine.render(prompt)
            prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + len(prompt.images) * image_tokens
        except BadRequest as exc:
            return error(exc.status, str(exc), exc.param)
        except (ValueError, TypeError) as exc:  # template errors and the like: the request's fault
            return error(400, str(exc))
        if prompt_tokens > limits.max_prompt_tokens:
            return error(400, f"the prompt has {prompt_tokens} tokens, over the limit of {limits.max_prompt_tokens}",
                         "messages")
        loop = asyncio.get_running_loop()
        job = _Job(prompt, params, loop, loop.create_future(), asyncio.Queue() if stream else None)
        batcher.submit(job)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            return StreamingResponse(_stream(job, request_id, created, prompt_tokens, extras),
                                     media_type="text/event-stream")
        try:
            completions = await asyncio.wait_for(asyncio.shield(job.future), timeout=request_timeout_s)
        except asyncio.TimeoutError:
            job.cancelled = True
            return error(504, f"the request took longer than {request_timeout_s:.0f} s")
        except Exception as exc:
            return error(500, f"generation failed: {exc}")
        metrics.served(prompt_tokens, completions, time.monotonic() - job.submitted)
        metrics.queue_time.observe((job.started or job.submitted) - job.submitted)
        choices = []
        for i, c in enumerate(completions):
            choices.append({"index": i, "message": _message(c), "finish_reason": _finish(c),
                            "bimode": {"mode": c.split.mode, "p_think": c.p_think,
                                       "budget_hit": c.finish_reason == "budget"}})
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": _usage(prompt_tokens, completions)}

    async def _stream(job: _Job, request_id: str, created: int, prompt_tokens: int, extras: dict):
        n = len(job.prompt.modes)
        # With a think threshold the engine picks an auto sample's mode suffix itself: known only at the end.
        chosen = job.params.think_threshold is not None
        streams = [ResponseStream(tokenizer, None if chosen and m is ThinkingMode.AUTO else m.prompt_suffix)
                   for m in job.prompt.modes]

        def chunk(index: int, delta: dict, finish: str | None = None) -> str:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_name, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(payload)}\n\n"

        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        deadline = time.monotonic() + request_timeout_s
        while not job.future.done() or not job.tokens.empty():
            try:
                index, token = await asyncio.wait_for(job.tokens.get(), timeout=0.05)
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    job.cancelled = True
                    metrics.failed(504)
                    yield f"data: {json.dumps({'error': {'message': 'request timed out', 'code': 504}})}\n\n"
                    return
                continue
            delta = _delta(streams[index].add(token))
            if delta:
                yield chunk(index, delta)
        try:
            completions = job.future.result()
        except Exception as exc:
            metrics.failed(500)
            yield f"data: {json.dumps({'error': {'message': f'generation failed: {exc}', 'code': 500}})}\n\n"
            return
        for i, c in enumerate(completions):  # what is left: held-back text, a cut-off character
            yield chunk(i, _delta(streams[i].finish(c.prompt_suffix, c.text)), _finish(c))
        metrics.served(prompt_tokens, completions, time.monotonic() - job.submitted)
        metrics.queue_time.observe((job.started or job.submitted) - job.submitted)
        if extras.get("include_usage"):
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_name, "choices": [], "usage": _usage(prompt_tokens, completions)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, allow_image_dir: str | None = None,
          trust_remote_code: bool = False, max_batch: int = 32, request_timeout_s: float = 300.0,
          served_model_name: str | None = None, api_key: str | None = None, max_model_len: int | None = None,
          max_tokens: int = 32768, default_chat_template_kwargs: dict | None = None,
          allow_remote_images: bool = False, remote_image_max_bytes: int = 20 * 1024 * 1024,
          remote_image_timeout_s: float = 10.0, think_threshold: float | None = None) -> None:
    import uvicorn
    from pathlib import Path

    from bimode.generation.backends import local_engine

    engine = local_engine(model_path, trust_remote_code=trust_remote_code, max_batch_rows=max_batch)
    limits = ServerLimits(allow_image_dir=Path(allow_image_dir) if allow_image_dir else None,
                          max_prompt_tokens=max_model_len or engine.context_length or 32768,
                          max_new_tokens=max_tokens, default_chat_template_kwargs=default_chat_template_kwargs or {},
                          allow_remote_images=allow_remote_images, remote_image_max_bytes=remote_image_max_bytes,
                          remote_image_timeout_s=remote_image_timeout_s, default_think_threshold=think_threshold)
    name = served_model_name or Path(model_path).name
    app = create_app(engine, name, limits, request_timeout_s=request_timeout_s, max_batch=max_batch,
                     api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
