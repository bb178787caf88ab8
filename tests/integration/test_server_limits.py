"""`bimode serve` bounds what a request costs and keeps the OpenAI contract (issue: hostile and heavy traffic).

The first four tests are the cases measured against the server before these bounds existed: a 10 MB prompt that
blocked the event loop for 10 s, 100,000 nested brackets that gave a 500, an unknown model answered 200, and
`logprobs` / `tools` / `response_format` silently ignored. The untrained tiny model on loopback; its rows never
stop early, so a request's length is its max_tokens.
"""

import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import torch

from bimode.generation.engine import TransformersEngine
from bimode.models import load_model
from bimode.serve.app import create_app
from bimode.serve.limits import BODY_TIMEOUT_S, ServerLimits
from tests.helpers.servers import serve_in_thread

LIMITS = ServerLimits(max_model_len=512, max_tokens=4096)
HI = [{"role": "user", "content": "Where is the ball?"}]


class RecordingEngine:
    """The engine, with every batch's completions kept, and batches held at a gate when asked."""

    def __init__(self, engine):
        self.engine, self.finished, self.gate = engine, [], threading.Event()
        self.gate.set()
        self.fail: Exception | None = None  # raised by generate when set (a bug inside the engine)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params, **kwargs):
        self.gate.wait()
        if self.fail is not None:
            raise self.fail
        results = self.engine.generate(prompts, params, **kwargs)
        self.finished.extend(c for group in results for c in group)
        return results


@pytest.fixture(scope="module")
def engine(tiny_dir):
    model, processor = load_model(tiny_dir, dtype=torch.float32)
    return TransformersEngine(model, processor)


@pytest.fixture
def serve(engine):
    """serve(**ServerLimits fields that differ from LIMITS) -> (base URL, the recording engine); stopped after the
    test."""
    stops = []

    def start(body_timeout_s: float = BODY_TIMEOUT_S, **limits):
        recording = RecordingEngine(engine)
        app = create_app(recording, "random", replace(LIMITS, **limits), body_timeout_s=body_timeout_s)
        base, stop = serve_in_thread(app)
        stops.append(stop)
        return base, recording

    yield start
    for stop in stops:
        stop()


def post(base: str, body, timeout: float = 60, **kwargs) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(base + "/v1/chat/completions", content=body, timeout=timeout,
                          headers={"content-type": "application/json"}, **kwargs)
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=timeout, **kwargs)


class HealthWatch:
    """Polls /health every 50 ms in a thread; `worst` is the slowest answer, `failures` what was not a 200."""

    def __init__(self, base: str):
        self.base, self.worst, self.count, self.stop = base, 0.0, 0, threading.Event()
        self.failures: list = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    status = client.get(self.base + "/health").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                if status != 200:
                    self.failures.append(status)
                self.worst = max(self.worst, time.monotonic() - start)
                self.count += 1
                time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)
        assert self.count > 0 and not self.failures, (self.count, self.failures[:3])


# ---- the four measured cases ------------------------------------------------------------------------------
def test_a_10_mb_prompt_is_refused_from_its_length_while_health_answers(serve):
    base, _ = serve()
    text = "word " * 2_000_000  # 10 MB
    with HealthWatch(base) as health:
        time.sleep(0.2)
        start = time.monotonic()
        reply = post(base, {"model": "random", "messages": [{"role": "user", "content": text}]})
        took = time.monotonic() - start
        time.sleep(0.2)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages" and "at least" in error["message"] and "over the limit of 512" in error["message"]
    print(f"10 MB prompt refused in {took:.2f} s; /health answered {health.count} times, slowest {health.worst:.3f} s")
    assert took < 5 and health.worst < 1.0  # before: 10.5 s, /health 9.5 s


def test_malformed_json_of_any_shape_is_a_400(serve):
    base, _ = serve()
    cases = {
        "deep nesting": "[" * 100_000 + "]" * 100_000,  # before: RecursionError, 500
        "deep object": '{"a":' * 100_000 + "1" + "}" * 100_000,
        "NaN": json.dumps({"messages": HI}).replace("}]", "}], \"temperature\": NaN"),
        "Infinity": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": Infinity}',
        "bad UTF-8": b'{"messages": "\xff\xfe"}',
        "truncated": '{"messages": [',
        "not an object": "[1, 2, 3]",
        "empty": "",
    }
    for name, body in cases.items():
        reply = post(base, body)
        assert reply.status_code == 400, (name, reply.status_code, reply.text[:200])
        assert reply.json()["error"]["type"] == "invalid_request_error", name


def test_an_unknown_model_is_a_404_model_not_found(serve):
    base, _ = serve()
    reply = post(base, {"model": "nope:think", "messages": HI, "max_tokens": 4})
    assert reply.status_code == 404, reply.text  # before: 200, answered by the served model
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'nope:think'" in error["message"]
    for name in ("random", "random:think", "random:no_think", "random:auto", None):
        assert post(base, {"model": name, "messages": HI, "max_tokens": 4}).status_code == 200, name


def _streamed_logprobs(base: str, body: dict) -> list[dict]:
    entries = []
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    entries += (choice.get("logprobs") or {}).get("content") or []
    return entries


def test_logprobs_are_honoured_and_fields_bimode_lacks_are_refused(serve):
    base, _ = serve()
    body = {"model": "random", "messages": HI, "max_tokens": 12, "logprobs": True, "top_logprobs": 3}
    reply = post(base, body).json()  # before: 200 without logprobs
    (choice,) = reply["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 12
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] <= 0
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and sum(2.718281828 ** t for t in top) <= 1 + 1e-5
        assert entry["logprob"] == pytest.approx(top[0], abs=1e-5)  # greedy: the token taken is the likeliest
    text = "".join(e["token"] for e in content)
    assert text.endswith(choice["message"]["content"][-3:])
    streamed = _streamed_logprobs(base, body)
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-5)
    assert post(base, {**body, "logprobs": False, "top_logprobs": 0}).json()["choices"][0]["logprobs"] is None

    refused = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],  # before: 200, ignored
        "response_format": {"type": "json_object"},  # before: 200, ignored
        "presence_penalty": 0.5,
        "stop": ["\n"],
        "top_logprobs": 2,  # without logprobs
        "frobnicate": 1,
        "chat_template_kwargs": {"thinking_mode": "long", "add_vision_id": True},
    }
    for field, value in refused.items():
        reply = post(base, {"model": "random", "messages": HI, "max_tokens": 4, field: value})
        assert reply.status_code == 400, (field, reply.text)
        assert reply.json()["error"]["param"].split(".")[0] == field, reply.json()
    # what clients send by default asks for nothing, and is accepted
    neutral = {"tools": [], "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
               "stop": None, "user": "someone", "logit_bias": {}}
    assert post(base, {"model": "random", "messages": HI, "max_tokens": 4, **neutral}).status_code == 200


def test_an_auto_answer_s_first_token_has_only_finite_alternatives(serve):
    """The mode decision is drawn from the decision tokens only: the other tokens' log-prob is -inf, which JSON
    cannot carry; they are left out of top_logprobs, streamed or not."""
    base, _ = serve()
    body = {"model": "random:auto", "messages": HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 20}
    first = post(base, body).json()["choices"][0]["logprobs"]["content"][0]
    assert 1 <= len(first["top_logprobs"]) < 20 and all(t["logprob"] > -1e4 for t in first["top_logprobs"])
    assert _streamed_logprobs(base, body)[0]["top_logprobs"] == first["top_logprobs"]


# ---- bounded body, queue and time ---------------------------------------------------------------------------
def test_a_body_over_the_cap_is_a_413_before_it_is_parsed(serve):
    base, _ = serve(max_request_bytes=1_000_000)
    reply = post(base, json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}))
    assert reply.status_code == 413 and "--max_request_bytes" in reply.json()["error"]["message"]
    chunks = (b"x" * 100_000 for _ in range(30))  # no Content-Length: counted while read
    reply = httpx.post(base + "/v1/chat/completions", content=chunks, timeout=30)
    assert reply.status_code == 413
    assert post(base, {"messages": HI, "max_tokens": 4}).status_code == 200


def test_a_body_that_trickles_in_is_a_408_and_gives_its_place_back(serve):
    import socket

    base, _ = serve(body_timeout_s=1.0, max_queued_requests=1)
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"messages\": ")  # and nothing more
        s.settimeout(10)
        start = time.monotonic()
        answer = s.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - start < 5, answer[:200]
    assert post(base, {"messages": HI, "max_tokens": 4}).status_code == 200  # its place among 1 came back


def test_a_request_cancelled_while_waiting_gives_its_place_back_at_once(serve):
    base, engine = serve(max_queued_requests=1)
    engine.gate.clear()  # the first request holds the engine
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, base, {"messages": HI, "max_tokens": 4})
        time.sleep(0.5)
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then its client leaves
            post(base, {"messages": HI, "max_tokens": 5}, timeout=0.5)
        time.sleep(0.3)
        waiting = pool.submit(post, base, {"messages": HI, "max_tokens": 6})  # admitted: the place is free
        time.sleep(0.3)
        engine.gate.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200, waiting.result().text


def test_past_the_queue_cap_requests_get_503_with_retry_after(serve):
    base, engine = serve(max_queued_requests=3)
    engine.gate.clear()  # the first batch holds the engine: the others wait
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, base, {"messages": HI, "max_tokens": 4}) for _ in range(8)]
        time.sleep(1.0)
        engine.gate.set()
        replies = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 3, statuses
    busy = [r for r in replies if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "--max_queued_requests 3" in r.json()["error"]["message"]
               for r in busy)
    assert post(base, {"messages": HI, "max_tokens": 4}).status_code == 200  # the queue drained


def test_a_request_past_its_deadline_stops_generating(serve):
    base, engine = serve(request_timeout=1.0)
    start = time.monotonic()
    reply = post(base, {"messages": HI, "max_tokens": 4000})
    assert reply.status_code == 504 and time.monotonic() - start < 3
    deadline = time.monotonic() + 5
    while not engine.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    (stopped,) = engine.finished
    assert stopped.finish_reason == "cancelled" and len(stopped.token_ids) < 4000
    assert post(base, {"messages": HI, "max_tokens": 4}).status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_goes_away_frees_its_slot(serve, stream):
    base, engine = serve()
    body = {"messages": HI, "max_tokens": 4000, "stream": stream}
    start = time.monotonic()
    if stream:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():  # until generated text arrives (the engine runs it), then hang up
                choices = json.loads(line[6:])["choices"] if line.startswith("data: ") else []
                if any(value for c in choices for key, value in c["delta"].items() if key != "role"):
                    break
    else:
        with pytest.raises(httpx.ReadTimeout):
            post(base, body, timeout=0.5)
    deadline = time.monotonic() + 5
    while not engine.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    (stopped,) = engine.finished
    print(f"generation stopped {time.monotonic() - start:.2f} s after the request, at {len(stopped.token_ids)} tokens")
    assert stopped.finish_reason == "cancelled" and len(stopped.token_ids) < 4000


def test_a_failed_generation_is_logged_with_its_traceback_and_answered_with_a_request_id(serve, caplog):
    """The engine's error stays in the server's log (with its traceback and the request's id); the client gets a
    generic 500 naming the id, plain or streaming, never the internals."""
    base, engine = serve()
    engine.fail = RuntimeError("device-side assert at 0xdeadbeef")
    with caplog.at_level(logging.ERROR, logger="bimode.serve.batcher"):
        plain = post(base, {"model": "random", "messages": HI, "max_tokens": 4})
        streamed = post(base, {"model": "random", "messages": HI, "max_tokens": 4, "stream": True})
    assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
    assert "0xdeadbeef" not in plain.text and "0xdeadbeef" not in streamed.text
    for reply in (plain.text, streamed.text):
        request_id = re.search(r"generation failed \(request (chatcmpl-\w+)", reply).group(1)
        logged = [r for r in caplog.records if request_id in r.getMessage()]
        assert logged and "0xdeadbeef" in str(logged[0].exc_info[1]), request_id
