"""BPO with TRL's colocated vLLM rollouts (CPU, in .venv-vllm) killed (SIGKILL) after a checkpoint and resumed by the
same command ends with the uninterrupted run's weights and probe log: colocated vLLM samples from the training
process's torch generator, which Trainer's checkpoint restores (docs/bpo.md, "Resuming a run"). Full weights and LoRA
(whose adapter TRL merges into vLLM's weights at each sync, and whose dropout draws resume too). Skipped while
.venv-vllm is missing."""

import pytest
import torch

from tests.helpers.killed_runs import (assert_same_steps, assert_same_weights, bpo_resume_command,
                                      kill_after_checkpoint, run_again, saved_tensors)
from tests.helpers.vllm_helpers import VLLM_PYTHON, needs_vllm, vllm_env

pytestmark = needs_vllm
VLLM_FLAGS = ["--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_max_model_length", "512"]
LORA_FLAGS = ["--use_peft", "true", "--lora_r", "4"]  # TRL's lora_dropout (0.05) kept: its draws must resume too


@pytest.mark.parametrize("extra", [[], LORA_FLAGS], ids=["full", "lora"])
def test_colocated_vllm_bpo_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
        tmp_path, trained_tiny, trained_families_file, extra):
    def command(out):
        return bpo_resume_command(trained_tiny, trained_families_file, out, *VLLM_FLAGS, *extra)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_again(str(VLLM_PYTHON), command(straight), vllm_env())  # uninterrupted
    kill_after_checkpoint(str(VLLM_PYTHON), command(killed), killed, "checkpoint-1", vllm_env())
    said = run_again(str(VLLM_PYTHON), command(killed), vllm_env())
    assert f"resuming from {killed / 'checkpoint-2'}" in said
    start, trained = saved_tensors(trained_tiny), saved_tensors(straight / "final")
    if extra:  # the run trained: LoRA's B matrices start at 0
        assert any(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)
    else:
        assert any(not torch.equal(t, start[k]) for k, t in trained.items() if k in start)
    assert_same_steps(killed, straight)
    assert_same_weights(killed / "final", straight / "final")
    assert (killed / "probe.jsonl").read_text() == (straight / "probe.jsonl").read_text()
