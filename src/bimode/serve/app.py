"""`bimode serve`: an OpenAI-compatible chat server over the generation engine; the routes and middleware.

One worker thread owns the engine and runs requests in batches (serve/batcher.py); serve/chat_service.py answers
a chat request. Reasoning is returned apart from the answer (as `reasoning` and `reasoning_content`, vLLM's new
and old names), split by bimode.streaming in both the streamed and the plain response, so the two agree for the
same tokens; usage's reasoning_tokens are the completions' thinking_tokens (generation.types.token_counts,
docs/tokens.md).

What one request may cost is bounded, and the event loop never waits on it: the body is read within
`max_request_bytes` (413 past it) and parsed in a worker thread, a prompt that cannot fit is refused from its
length before it is tokenized, tokenizing and image decoding run in worker threads, at most `max_queued_requests`
wait for the engine (503 with Retry-After past it), and a request whose deadline passes or whose client goes away
stops generating at the engine's next step (serve/limits.py). Every field of a request is honoured or refused
(serve/requests.py). docs/serving_and_eval.md has the limits and what a hostile-traffic test measured.

At `/` a chat page (serve/page.py, the files in serve/ui/) talks to /v1/chat/completions like any client.
"""

from __future__ import annotations

import hmac
import os
import signal
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from bimode.serve.batcher import Batcher
from bimode.serve.chat_service import ChatService
from bimode.serve.drain import Drain
from bimode.serve.errors import error_response
from bimode.serve.limits import BODY_TIMEOUT_S, ServerLimits, engine_limits, resolve_limits
from bimode.serve.metrics import ServerMetrics
from bimode.serve.page import add_page
from bimode.serve.requests import MODEL_MODES


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


def create_app(engine, model_name: str, limits: ServerLimits = ServerLimits(), api_key: str | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S, ui: bool = True):
    """The app. With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`. `ui`: the chat page at
    `/` (serve/page.py; it asks for the key itself). `app.state.drain` (Drain) is started by `serve` on SIGTERM."""
    app = FastAPI(title="bimode", description="OpenAI-compatible auto-thinking VLM server")
    drain = app.state.drain = Drain()
    metrics = ServerMetrics()
    limits = engine_limits(resolve_limits(limits, engine), engine)
    batcher = Batcher(engine, max_batch=limits.max_batch, max_queued=limits.max_queued_requests)
    service = ChatService(engine, model_name, limits, batcher, metrics, drain, body_timeout_s)
    if api_key:
        app.add_middleware(RequireKey, key=api_key, metrics=metrics)

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
        return await service.chat(request)

    if ui:
        add_page(app)
    return app


def serve(cfg) -> None:
    """Serve `bimode serve`'s config (ServeConfig) until SIGTERM or Ctrl-C. SIGTERM stops accepting requests,
    lets those running finish within `cfg.shutdown_timeout` (then answers what is left with 503) and returns, so
    the process exits 0."""
    from bimode.generation.backends import local_engine

    engine = local_engine(cfg.model, trust_remote_code=cfg.trust_remote_code, max_batch_rows=cfg.max_batch)
    name = cfg.served_model_name or Path(cfg.model).name
    app = create_app(engine, name, ServerLimits.from_config(cfg),
                     api_key=cfg.api_key or os.environ.get("BIMODE_API_KEY") or None, ui=not cfg.no_ui)
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
