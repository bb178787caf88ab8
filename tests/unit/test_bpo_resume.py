"""BPO killed (SIGKILL) after a checkpoint and resumed by the same command (`--resume_from_checkpoint true`) ends with
the uninterrupted run's weights, rollouts included (the engine's per-step seeds, TRL's sampler, the p_think probe),
full and LoRA, on bimode's engine."""

import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.killed_runs import (assert_same_steps, assert_same_weights, bpo_resume_command,
                                      kill_after_checkpoint, run_again, saved_tensors)

LORA_FLAGS = ["--use_peft", "true", "--lora_r", "4"]  # TRL's lora_dropout (0.05) kept: its draws must resume too


@pytest.fixture(scope="module")
def bpo_command(trained_tiny, trained_families_file):
    """The argv (after `bimode`) of a 3-step BPO run saving every step into `out`; the last reward holds the run
    a step after a named checkpoint (tests/helpers/bpo_helpers.hold_once_saved), where the test asks."""

    def command(out: Path, *extra: str) -> list[str]:
        return bpo_resume_command(trained_tiny, trained_families_file, out, *extra)

    return command


def test_resume_true_takes_the_latest_fully_written_checkpoint_or_none(tmp_path):
    from bimode.train.checkpoint import FULLY_WRITTEN, resume_point

    assert resume_point(tmp_path, "true") is None  # a first run: step 0, so one command starts and resumes
    for step in (2, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}" / FULLY_WRITTEN).write_text("{}")
    # checkpoint-12 was cut short by a kill mid-save; 10 beats 2 by number, not by name
    assert resume_point(tmp_path, "true") == str(tmp_path / "checkpoint-10") == resume_point(tmp_path, True)
    assert resume_point(tmp_path, str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    assert resume_point(tmp_path, None) is None and resume_point(tmp_path, "false") is None


@pytest.mark.parametrize("extra", [[], LORA_FLAGS], ids=["full", "lora"])
def test_bpo_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path, bpo_command, extra,
                                                                           trained_tiny):
    """Killed in step 3's rollouts with checkpoint-2 marked cut short: the same command, in a new process, redoes
    steps 2 and 3 from checkpoint-1 (the probe line the killed run wrote in step 2 included)."""
    from bimode.cli import main

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(bpo_command(straight, *extra)) == 0
    for checkpoint in straight.glob("checkpoint-*"):  # what resume_point relies on: trainer_state.json is written last
        last = (checkpoint / "trainer_state.json").stat().st_mtime_ns
        assert all(p.stat().st_mtime_ns <= last for p in checkpoint.iterdir()), checkpoint
    kill_after_checkpoint(sys.executable, bpo_command(killed, *extra), killed, "checkpoint-1")
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    (killed / "checkpoint-2" / "trainer_state.json").unlink()  # as if the kill had cut its save short
    said = run_again(sys.executable, bpo_command(killed, *extra))  # the same command, in a new process
    assert f"resuming from {killed / 'checkpoint-1'}" in said
    expected = saved_tensors(straight / "final")
    if extra:  # the run trained: LoRA's B matrices start at 0
        assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k)
    else:
        start = saved_tensors(trained_tiny)
        assert any(not torch.equal(t, start[k]) for k, t in expected.items() if k in start)
    assert_same_steps(killed, straight)
    assert_same_weights(killed / "final", straight / "final")
    # the probe's log: each step once, as the uninterrupted run wrote it
    assert (killed / "probe.jsonl").read_text() == (straight / "probe.jsonl").read_text()
