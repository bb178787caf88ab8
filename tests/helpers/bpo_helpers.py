"""Controlled rewards for the BPO tests, importable by path (`tests.helpers.bpo_helpers:...`), and readers of what
BPO logs."""

import logging
import os
import time
from pathlib import Path


def no_think_wins(prompts, completions, completion_ids, rollout_mode, **kwargs):
    return [float(mode == "no_think") for mode in rollout_mode]


def think_wins(prompts, completions, completion_ids, rollout_mode, **kwargs):
    return [float(mode == "think") for mode in rollout_mode]


def half_the_direct_answers_right(prompts, completions, completion_ids, rollout_mode, **kwargs):
    """Every thinking rollout right, the direct ones right and wrong in turn (half of each group's)."""
    direct = [i for i, mode in enumerate(rollout_mode) if mode == "no_think"]
    right_direct = set(direct[::2])
    return [float(mode == "think" or i in right_direct) for i, mode in enumerate(rollout_mode)]


def fails_on_thinking(prompts, completions, completion_ids, rollout_mode, **kwargs):
    if any(mode == "think" for mode in rollout_mode):
        raise RuntimeError("this reward cannot score thinking rollouts")
    return [1.0] * len(rollout_mode)


def none_on_thinking(prompts, completions, completion_ids, rollout_mode, **kwargs):
    """Cannot score thinking rollouts (TRL's None); every direct answer scores 1."""
    return [None if mode == "think" else 1.0 for mode in rollout_mode]


HOLD_AFTER = "BIMODE_TEST_HOLD_AFTER"  # a checkpoint folder: hold_once_saved holds a step after it is written
HOLDING = "BIMODE_TEST_HOLDING"  # the file hold_once_saved creates when it holds
_scored_after_checkpoint = []


def hold_once_saved(prompts, completions, completion_ids, **kwargs):
    """0 for every rollout (adds nothing to any advantage). Where the environment names a checkpoint folder
    (HOLD_AFTER), the second rollout batch scored after it is fully written (its trainer_state.json, which
    Trainer writes last) creates the HOLDING file and waits to be killed: the step after the checkpoint has run
    (its probe line written, its weights not saved), as a kill at any time after a checkpoint leaves a run."""
    after, holding = os.environ.get(HOLD_AFTER), os.environ.get(HOLDING)
    if after and holding and (Path(after) / "trainer_state.json").exists():
        _scored_after_checkpoint.append(len(completion_ids))
        if len(_scored_after_checkpoint) == 2:
            Path(holding).touch()
            time.sleep(300)  # killed long before; a run that goes on anyway fails the test by its exit status
    return [0.0] * len(completion_ids)


def trained_p_think_drop(trainer) -> tuple[float, dict, dict]:
    """Probe p_think, train, probe again: the mean drop over levels, and both probes (for the message)."""
    before = trainer.probe()
    trainer.train()
    after = trainer.probe()
    levels = [k for k in before if k.startswith("p_think/")]
    return sum(before[k] - after[k] for k in levels) / len(levels), before, after


def always_right(prompts, completions, completion_ids, rollout_mode, **kwargs):
    """Both modes answer every query correctly: R-4B's accuracy-only BPO has nothing to learn from it."""
    return [1.0] * len(rollout_mode)


class LastLogged:
    """logged[key]: the last value of a metric collected for the trainer's next logging step, read through
    bimode's one adapter to TRL's metrics (compat/trl_api.py), not the trainer's private state."""

    def __init__(self, trainer, mode: str = "train"):
        self.trainer, self.mode = trainer, mode

    def __getitem__(self, key: str) -> float:
        from bimode.compat.trl_api import logged_metric

        return logged_metric(self.trainer, key, self.mode)[-1]


FORWARD_PATH_SAID = "BPO scores rollouts with "  # what the trainer logs once per forward path it takes


def forward_path(message: str) -> str | None:
    """The forward path a log message of BPO's names, or None for any other message."""
    return message[len(FORWARD_PATH_SAID):] if message.startswith(FORWARD_PATH_SAID) else None


class ForwardPaths(logging.Handler):
    """The forward paths BPO says it scores rollouts with (its log), collected while `listening()`."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.paths: set[str] = set()

    def emit(self, record):
        if (path := forward_path(record.getMessage())) is not None:
            self.paths.add(path)

    @classmethod
    def listening(cls) -> "ForwardPaths":
        handler = cls()
        bpo_log = logging.getLogger("bimode.train.bpo.trainer")
        bpo_log.addHandler(handler)
        bpo_log.setLevel(logging.INFO)
        return handler
