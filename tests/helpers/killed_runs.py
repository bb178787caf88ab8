"""Training commands killed at a known point and run again (the BPO resume tests): the kill, the saved weights."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.bpo_helpers import HOLD_AFTER, HOLDING

ROOT = Path(__file__).resolve().parents[2]


def bpo_resume_command(model: Path, train_file: Path, out: Path, *extra: str) -> list[str]:
    """`bimode bpo` (the argv after `bimode`) for 3 steps on the tiny model, a checkpoint each, with
    `--resume_from_checkpoint true`: the same command starts the run and resumes it. Its last reward holds the
    run where kill_after_checkpoint asks (bpo_helpers.hold_once_saved) and adds nothing anywhere else; a reward for
    the no-think mode gives every group an advantage, so each step's update depends on its rollouts' tokens (with
    accuracy alone a step whose rollouts all fail has no gradient, and a resume that drew other rollouts passes)."""
    return ["bpo", "--config", str(ROOT / "configs/recipes/tiny_bpo.yaml"), "--model_path", str(model),
            "--train_files", str(train_file), "--probe_files", str(train_file), "--output_dir", str(out),
            "--max_steps", "3", "--save_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "8",
            "--max_completion_length", "24", "--learning_rate", "1e-2", "--probe_steps", "1", "--probe_size", "8",
            "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--resume_from_checkpoint", "true",
            "--rewards", "accuracy", "tests.helpers.bpo_helpers:no_think_wins",
            "tests.helpers.bpo_helpers:hold_once_saved", *extra]


def kill_after_checkpoint(python: str, argv: list[str], out: Path, checkpoint: str, env: dict | None = None) -> None:
    """Run `python -m bimode.cli ARGV` until it has written OUT/CHECKPOINT and trained one step more (held by
    bpo_helpers.hold_once_saved, the last of its rewards), then SIGKILL it and whatever it started (its session),
    as a lost node would."""
    holding, log = (out.parent / f"{out.name}.{suffix}" for suffix in ("holding", "log"))
    env = {**(env or os.environ), HOLD_AFTER: str(out / checkpoint), HOLDING: str(holding)}
    with open(log, "w") as stream:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen([python, "-m", "bimode.cli", *argv], cwd=ROOT, env=env, stdout=stream,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while not holding.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the session this call started, and nothing else
        proc.wait()
    assert holding.exists() and proc.returncode == -signal.SIGKILL, \
        f"not killed after {checkpoint}:\n{log.read_text()[-3000:]}"
    assert not (out / "final").exists()


def run_again(python: str, argv: list[str], env: dict | None = None) -> str:
    """`python -m bimode.cli ARGV` in a new process, to its end; its stderr (where it says what it resumed from)."""
    done = subprocess.run([python, "-m", "bimode.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no weights in {folder}"
    return tensors


def assert_same_weights(got: Path, expected: Path) -> None:
    """The saved weights in two folders, equal at the annealing resume test's tolerance."""
    a, b = saved_tensors(got), saved_tensors(expected)
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


ROLLOUT_METRICS = ("completions/mean_length", "completions/max_length", "reward", "reward_std", "loss", "grad_norm",
                   "entropy")


def assert_same_steps(got: Path, expected: Path) -> None:
    """Each step's rollout metrics (lengths, rewards, loss), as the last checkpoint of each run logged them: equal, so
    a resumed run drew the uninterrupted run's rollouts."""

    def steps(out: Path) -> list[dict]:
        last = max(Path(out).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        history = json.loads((last / "trainer_state.json").read_text())["log_history"]
        return [{k: e[k] for k in ("step", *ROLLOUT_METRICS) if k in e} for e in history if "loss" in e]

    ours, theirs = steps(got), steps(expected)
    assert len(theirs) > 1 and [e.keys() for e in ours] == [e.keys() for e in theirs]
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), (a, b)
