"""BPO killed (SIGKILL) after a checkpoint and resumed by the same command (`--resume_from_checkpoint true`) ends with
the uninterrupted run's weights, rollouts included (the engine's per-step seeds, TRL's sampler, the p_think probe),
full and LoRA, on bimode's engine."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.bpo_helpers import HOLD_AFTER, HOLDING

ROOT = Path(__file__).resolve().parents[2]
LORA_FLAGS = ["--use_peft", "true", "--lora_r", "4"]  # TRL's lora_dropout (0.05) kept: its draws must resume too


@pytest.fixture(scope="module")
def bpo_command(trained_tiny, trained_families_file):
    """The argv (after `bimode`) of a 3-step BPO run saving every step into `out`; the last reward holds the run
    a step after a named checkpoint (tests/helpers/bpo_helpers.hold_once_saved), where the test asks."""

    def command(out: Path, *extra: str) -> list[str]:
        return ["bpo", "--config", str(ROOT / "configs/recipes/tiny_bpo.yaml"), "--model_path", str(trained_tiny),
                "--train_files", str(trained_families_file), "--probe_files", str(trained_families_file),
                "--output_dir", str(out), "--max_steps", "3", "--save_steps", "1", "--num_generations", "4",
                "--per_device_train_batch_size", "8", "--max_completion_length", "24", "--learning_rate", "1e-2",
                "--probe_steps", "1", "--probe_size", "8", "--logging_steps", "1", "--report_to", "none",
                "--use_cpu", "true", "--resume_from_checkpoint", "true",
                "--rewards", "accuracy", "tests.helpers.bpo_helpers:hold_once_saved", *extra]

    return command


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no weights in {folder}"
    return tensors


def kill_after_checkpoint(argv: list[str], out: Path, checkpoint: str) -> None:
    """Run `bimode ARGV` in its own process until it has written OUT/CHECKPOINT and trained one step more, then
    SIGKILL it (in the rollouts of the step after that)."""
    holding, log = (out.parent / f"{out.name}.{suffix}" for suffix in ("holding", "log"))
    env = {**os.environ, HOLD_AFTER: str(out / checkpoint), HOLDING: str(holding)}
    with open(log, "w") as stream:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen([sys.executable, "-m", "bimode.cli", *argv], cwd=ROOT, env=env, stdout=stream,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not holding.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holding.exists() and proc.returncode == -signal.SIGKILL, \
        f"not killed after {checkpoint}:\n{log.read_text()[-3000:]}"
    assert not (out / "final").exists()


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
    kill_after_checkpoint(bpo_command(killed, *extra), killed, "checkpoint-1")
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    (killed / "checkpoint-2" / "trainer_state.json").unlink()  # as if the kill had cut its save short
    again = subprocess.run([sys.executable, "-m", "bimode.cli", *bpo_command(killed, *extra)], cwd=ROOT,
                           capture_output=True, text=True)  # the same command, in a new process: it resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoint-1'}" in again.stderr
    expected, got = saved_tensors(straight / "final"), saved_tensors(killed / "final")
    assert expected.keys() == got.keys()
    if extra:  # the run trained: LoRA's B matrices start at 0
        assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k)
    else:
        start = saved_tensors(trained_tiny)
        assert any(not torch.equal(t, start[k]) for k, t in expected.items() if k in start)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the probe's log: each step once, as the uninterrupted run wrote it
    assert (killed / "probe.jsonl").read_text() == (straight / "probe.jsonl").read_text()
