"""build_backend: one spec string -> the backend it names, each meeting the GenerationBackend interface."""

import pytest

from bimode.generation.backends import GenerationBackend, build_backend
from bimode.generation.engine import TransformersEngine
from bimode.generation.openai_backend import OpenAIEndpointBackend


def test_a_local_directory_is_the_transformers_engine(tiny_dir):
    backend = build_backend(str(tiny_dir), max_batch_rows=7)
    assert isinstance(backend, TransformersEngine) and isinstance(backend, GenerationBackend)
    assert backend.max_batch_rows == 7


def test_a_url_is_an_endpoint_client():
    backend = build_backend("http://127.0.0.1:9/v1", model_name="tiny:think", api_key="k", concurrency=3)
    assert isinstance(backend, OpenAIEndpointBackend) and isinstance(backend, GenerationBackend)
    assert backend.model == "tiny:think" and backend.concurrency == 3


def test_vllm_spec_needs_the_vllm_environment(tiny_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="setup-vllm"):
            build_backend(f"vllm:{tiny_dir}")
    else:  # pragma: no cover - the main environment has no vLLM (it holds transformers past vLLM 0.31's range)
        pytest.skip("vLLM is importable here: tests/integration/test_vllm_backend.py covers it")


def test_every_backend_renders_and_streams_through_one_interface(engine):
    """The endpoint client (given the served model's tokenizer) renders as the engine does, and hands on_token
    the tokens of each finished completion: what follows the `<think>` the server opens, so the text a
    streaming caller rebuilds is the engine's response to the same greedy request."""
    from bimode.data import synthetic
    from bimode.generation.types import Prompt, SamplingParams
    from bimode.modes import ThinkingMode
    from bimode.serve.app import create_app
    from bimode.serve.limits import ServerLimits
    from tests.helpers.servers import serve_in_thread
    from tests.helpers.trained import TRAINED_FAMILIES

    record = synthetic.generate(1, seed=5, split="eval", families=TRAINED_FAMILIES, max_level=2)[0].to_record()
    prompt = Prompt.from_record(record, [ThinkingMode.THINK, ThinkingMode.NO_THINK])
    params = SamplingParams(max_new_tokens=16)
    base, stop = serve_in_thread(create_app(engine, "tiny", ServerLimits(max_tokens=64)))
    try:
        client = build_backend(base, model_name="tiny")
        with pytest.raises(ValueError, match="tokenizer"):
            client.render(prompt)
        client.tokenizer = engine.tokenizer
        streamed: dict = {}
        got = client.generate([prompt], params, on_token=lambda pi, si, t, _logprob: streamed.setdefault((pi, si), []).append(t))
    finally:
        stop()
    for mode in ThinkingMode:
        assert client.render(prompt, mode) == engine.render(prompt, mode)
    local = engine.generate([prompt], params)[0]
    assert [c.response for c in got[0]] == [c.response for c in local]
    for si, (remote, own) in enumerate(zip(got[0], local)):
        assert remote.prompt_suffix + engine.tokenizer.decode(streamed[(0, si)]) == own.response


def test_mode_slots_fan_a_batch_out_per_prompt_and_mode():
    from bimode.generation.types import mode_slots
    from bimode.modes import ThinkingMode as M

    assert mode_slots([[M.THINK, M.NO_THINK, M.THINK], [M.AUTO], []]) == [
        (0, M.THINK, [0, 2]), (0, M.NO_THINK, [1]), (1, M.AUTO, [0])]
