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
    else:  # pragma: no cover - the main environment has no vLLM (its pins clash with ours)
        pytest.skip("vLLM is importable here: tests/test_vllm_backend.py covers it")
