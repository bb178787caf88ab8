"""The pure parts of bimode.train.vllm_fit (the vLLM-side runs are in tests/test_bpo_vllm.py)."""

from types import SimpleNamespace

from bimode.train.vllm_fit import BAN_BIAS, collapse_image_runs, colocated_llm_kwargs, with_banned_tokens


def test_each_run_of_image_tokens_becomes_one_placeholder():
    assert collapse_image_runs([1, 5, 5, 5, 2, 5, 5, 3], 5) == [1, 5, 2, 5, 3]
    assert collapse_image_runs([5, 5], 5) == [5]
    assert collapse_image_runs([1, 2, 3], 5) == [1, 2, 3]


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
