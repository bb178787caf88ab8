"""A composed checkpoint runs in vLLM (vLLM's environment) as in transformers: the same greedy tokens and
log-probs from bimode's engine and from vLLM, images included."""

from __future__ import annotations

from tests.helpers.vllm_helpers import needs_vllm, run_vllm_script
from tests.integration.test_vllm_backend import CPU_LLM, assert_same

pytestmark = needs_vllm


def test_vllm_generates_what_transformers_does_from_a_composed_model(tmp_path):
    import torch

    from bimode.data import synthetic
    from bimode.generation.engine import TransformersEngine
    from bimode.generation.types import Prompt, SamplingParams
    from bimode.models import load_model
    from bimode.models.compose import compose
    from bimode.models.tiny import build_tiny_parts

    vision, llm = build_tiny_parts(tmp_path / "parts")
    model_dir = compose(vision, llm, tmp_path / "composed")
    records = [s.to_record() for s in synthetic.generate(2, seed=1, split="eval", families=["count", "shell"])]
    prompts = [Prompt.from_record(r, ["think", "no_think"]) for r in records]
    specs = []
    for i, p in enumerate(prompts):
        p.images[0].save(tmp_path / f"p{i}.png")
        specs.append({"messages": p.messages, "images": [str(tmp_path / f"p{i}.png")], "modes": ["think", "no_think"]})
    params = {"max_new_tokens": 8, "logprobs": True}
    model, processor = load_model(model_dir, dtype=torch.float32)
    expected = TransformersEngine(model, processor).generate(prompts, SamplingParams(**params))
    out = run_vllm_script("run_backend.py", {"model": str(model_dir), "llm": CPU_LLM, "prompts": specs,
                                             "runs": {"greedy": {"params": params, "prompts": None}},
                                             "media_probe": None}, tmp_path)
    for hf_group, vllm_group in zip(expected, out["runs"]["greedy"], strict=True):
        assert_same(hf_group, vllm_group, logprobs=True)
    image_id, image_tokens = model.config.image_token_index, model.config.image_seq_length
    for group in out["runs"]["greedy"]:  # vLLM expanded each image into the composed model's image tokens
        assert all(c["prompt_token_ids"].count(image_id) == image_tokens for c in group)
