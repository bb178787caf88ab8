"""BPO with TRL's colocated vLLM rollouts, on CPU, in the vLLM environment (`make setup-vllm`).

One run of tests/vllm_scripts/bpo_colocate.py: a few BPO steps on the trained tiny model, then checks that
forced mode tokens carry no sampling log-prob, that TRL's log-probs agree with vLLM's during training, that the
weights reach vLLM (after a sync, vLLM scores like the trained model and unlike the starting one), and that
the saved model is whole. Skipped only while .venv-vllm is missing.
"""

import math
from pathlib import Path

import pytest

from bimode.data import synthetic
from bimode.data.records import write_records
from tests.hf_fixtures import saved_vision_keys
from tests.vllm_helpers import needs_vllm, run_vllm_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = needs_vllm


@pytest.fixture(scope="module")
def colocate_run(tmp_path_factory, trained_tiny):
    tmp = tmp_path_factory.mktemp("bpo_vllm")
    train = tmp / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(32, seed=4, families=["count", "shell"],
                                                             max_level=3)], train)
    args = ["--config", str(ROOT / "configs/recipes/tiny_bpo.yaml"), "--model_path", str(trained_tiny),
            "--train_files", str(train), "--probe_files", str(train), "--output_dir", str(tmp / "run"),
            "--max_steps", "3", "--per_device_train_batch_size", "16", "--num_generations", "8",
            "--max_completion_length", "24", "--learning_rate", "1e-3", "--warmup_steps", "0",
            "--logging_steps", "1", "--probe_steps", "0", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true",
            "--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_max_model_length", "512"]
    return run_vllm_script("bpo_colocate.py", {"args": args, "probe_prompts": 6}, tmp, timeout=600)


def test_forced_mode_tokens_carry_no_sampling_logprob(colocate_run):
    rollouts = colocate_run["rollouts"]
    assert len(rollouts) == 16 and {r["forced"] for r in rollouts} == {1, 3}  # `\n` vs `\n\n</think>\n\n`
    for r in rollouts:
        forced, sampled = r["logprobs"][:r["forced"]], r["logprobs"][r["forced"]:]
        assert all(math.isnan(x) for x in forced)
        assert sampled and all(math.isfinite(x) and x <= 0 for x in sampled)


def test_trl_and_vllm_logprobs_agree_at_every_step(colocate_run):
    steps = [log for log in colocate_run["logged"] if "sampling/sampling_logp_difference/mean" in log]
    assert len(steps) == 3
    for log in steps:
        # vLLM samples with media tokens banned, TRL scores the unbanned policy: their mass (about 1e-3 on
        # this model) is the only gap; a stale or misnamed weight sync gives gaps of 1e-2 and more
        assert log["sampling/sampling_logp_difference/mean"] < 2e-3, log
        assert 0.95 < log["sampling/importance_sampling_ratio/mean"] < 1.05, log


def test_weights_reach_vllm_after_an_update(colocate_run):
    before, after = colocate_run["before_sync"], colocate_run["after_sync"]
    assert before["vllm_vs_trained"] > 1e-2  # the last update changed the model (vLLM held the older weights)
    # after the sync vLLM scores like the trained model, also on images it encoded before the sync
    assert after["vllm_vs_trained"] < 1e-4, after
    assert after["vllm_vs_start"] > 1e-2, after


def test_the_saved_model_is_whole_and_in_vllm_s_layout(colocate_run):
    final = Path(colocate_run["saved"])
    assert (final / "model.safetensors").exists() and (final / "chat_template.jinja").exists()
    assert all(k.startswith("vision_tower.vision_model.") for k in saved_vision_keys(final))
