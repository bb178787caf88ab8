"""The pure parts of bimode.train.bpo.vllm_fit (the vLLM-side runs are in tests/integration/test_bpo_vllm.py)."""

from types import SimpleNamespace

import pytest

from bimode.train.bpo.vllm_fit import BAN_BIAS, collapse_image_runs, colocated_llm_kwargs, with_banned_tokens

pytestmark = pytest.mark.internals  # runs at both ends of the transformers range (docs/internals.md)


def test_each_image_s_run_of_tokens_becomes_one_placeholder():
    assert collapse_image_runs([1, 5, 5, 2, 5, 5, 3], 5, 2) == [1, 5, 2, 5, 3]
    assert collapse_image_runs([5, 5, 5, 5, 7], 5, 2) == [5, 5, 7]  # two images side by side: two placeholders
    assert collapse_image_runs([5, 5, 9], 5, 1) == [5, 9]
    assert collapse_image_runs([1, 2, 3], 5, 0) == [1, 2, 3]
    with pytest.raises(ValueError, match="3 image"):
        collapse_image_runs([5, 5, 2, 5, 5], 5, 3)  # 4 tokens cannot be 3 images of one size


def test_banned_tokens_join_the_user_s_logit_bias():
    kwargs = {"logit_bias": {7: 1.5}, "min_tokens": 2}
    out = with_banned_tokens(kwargs, [3, 4])
    assert out == {"logit_bias": {7: 1.5, 3: BAN_BIAS, 4: BAN_BIAS}, "min_tokens": 2}
    assert kwargs == {"logit_bias": {7: 1.5}, "min_tokens": 2}  # the caller's dict is left alone
    assert with_banned_tokens(None, []) == {}


def test_the_colocated_engine_computes_in_the_training_precision():
    fp32 = SimpleNamespace(bf16=False, fp16=False)
    assert colocated_llm_kwargs(fp32, on_cpu=True) == {"dtype": "float32", "enforce_eager": True}
    assert colocated_llm_kwargs(fp32, on_cpu=False) == {"dtype": "float32"}
    assert colocated_llm_kwargs(SimpleNamespace(bf16=True, fp16=False), on_cpu=False) == {}


@pytest.mark.parametrize("send_copies", [True, False])
def test_a_lora_sync_inside_the_reload_sends_copies(monkeypatch, send_copies):
    """vLLM's layer-wise reload may read a tensor it was sent only when the reload ends, after TRL has unmerged
    the adapter from it in place (docs/vllm.md): with send_copies, what it holds keeps the merged values."""
    import torch
    from trl.generation.vllm_generation import VLLMGeneration

    from bimode.train.bpo.vllm_fit import BimodeVLLMGeneration

    merged, rows = torch.ones(3), torch.zeros(2)
    monkeypatch.setattr(VLLMGeneration, "_iter_named_params", lambda self: iter([
        ("lm_head.weight", merged), ("lm_head.token_adapter.trainable_tokens_delta.default", rows)]))
    generation = BimodeVLLMGeneration.__new__(BimodeVLLMGeneration)
    generation.send_copies = send_copies
    sent = list(generation._iter_named_params())
    merged.zero_()  # TRL's unmerge_adapter, in place, after the loop
    assert [name for name, _ in sent] == ["lm_head.weight"]  # PEFT's own rows are not sent
    assert sent[0][1].tolist() == ([1.0] * 3 if send_copies else [0.0] * 3)
