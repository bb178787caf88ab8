"""The vLLM backend gives what the transformers engine gives (greedy); runs only where vLLM and a GPU are."""

import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU")


def test_vllm_matches_transformers_engine_greedy(trained_tiny):
    from bimode.data import synthetic
    from bimode.generation.engine import TransformersEngine
    from bimode.generation.types import Prompt, SamplingParams
    from bimode.generation.vllm_backend import VLLMBackend
    from bimode.models import load_model

    records = [s.to_record() for s in synthetic.generate(8, seed=3, split="eval", families=["count", "shell"],
                                                         max_level=3)]
    prompts = [Prompt.bimode_group(r, 1) for r in records]
    params = SamplingParams(max_new_tokens=24)
    model, processor = load_model(trained_tiny)
    expected = TransformersEngine(model, processor).generate(prompts, params)
    got = VLLMBackend(str(trained_tiny), dtype="float32", gpu_memory_utilization=0.3).generate(prompts, params)
    agree = sum(e.parsed.answer == g.parsed.answer for eg, gg in zip(expected, got) for e, g in zip(eg, gg))
    assert agree >= 0.9 * 2 * len(records)
    assert all(g[0].response.startswith("<think>\n") and g[1].response.startswith("<think>\n\n</think>")
               for g in got)
