"""A request body read within a byte cap and parsed off the event loop, with a 4xx for every way it can be bad."""

from __future__ import annotations

import asyncio
import json

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from bimode.errors import UsageError
from bimode.serve.errors import BadRequest

# Past the cap the rest of a body is still read (and dropped), up to this much and this long, so that the client
# finishes sending and reads the 413 instead of a reset connection; a larger or slower one is cut off.
DRAIN_BYTES = 256 * 1024 * 1024
DRAIN_S = 5.0


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or BadRequest 413 as soon as it is known to pass `max_bytes` (from Content-Length or while
    reading): memory and time in proportion to the cap, not to what the client sends."""
    declared = request.headers.get("content-length", "")
    too_large = BadRequest(f"the request body is larger than {max_bytes} bytes (--max_request_bytes)", status=413)
    if declared.isdigit() and int(declared) > max_bytes:
        if int(declared) <= DRAIN_BYTES:
            await _drain(request)
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                await _drain(request)
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client closed the connection while sending the body") from None
    return b"".join(chunks)


async def _drain(request: Request) -> None:
    async def drop() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_BYTES:
                return

    try:
        await asyncio.wait_for(drop(), DRAIN_S)
    except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):  # RuntimeError: the stream was consumed
        pass


def _refuse_constant(name: str):
    raise UsageError(f"{name} is not a JSON number")


def parse_json(raw: bytes):
    """The body as JSON. Malformed of any kind (bad UTF-8, bad syntax, NaN / Infinity, nesting deeper than the
    parser's recursion allows) is the client's error: BadRequest, never a 500."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8") from None
    except RecursionError:
        raise BadRequest("the request body nests JSON too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError and NaN / Infinity
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None


async def read_json(request: Request, max_bytes: int):
    """read_body, then parse_json in a worker thread: a large body never blocks the event loop while parsed."""
    raw = await read_body(request, max_bytes)
    return await run_in_threadpool(parse_json, raw)
