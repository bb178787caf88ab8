"""Controlled rewards for the BPO tests, importable by path (`tests.helpers.bpo_helpers:...`), and readers of what
BPO logs."""

import logging


def no_think_wins(prompts, completions, completion_ids, rollout_mode, **kwargs):
    return [float(mode == "no_think") for mode in rollout_mode]


def think_wins(prompts, completions, completion_ids, rollout_mode, **kwargs):
    return [float(mode == "think") for mode in rollout_mode]


def fails_on_thinking(prompts, completions, completion_ids, rollout_mode, **kwargs):
    if any(mode == "think" for mode in rollout_mode):
        raise RuntimeError("this reward cannot score thinking rollouts")
    return [1.0] * len(rollout_mode)


def none_on_thinking(prompts, completions, completion_ids, rollout_mode, **kwargs):
    """Cannot score thinking rollouts (TRL's None); every direct answer scores 1."""
    return [None if mode == "think" else 1.0 for mode in rollout_mode]


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
