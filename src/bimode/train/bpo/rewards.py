"""Reward functions for BPO in TRL's calling convention, and the guard that keeps a failing one from stopping
training.

TRL calls `f(prompts=, completions=, completion_ids=, **dataset_columns)` and wants one float per rollout.
TRL decodes `completions` with special tokens removed, which strips `<think>`/`</think>` on tokenizers that
register them as special; the rewards here decode `completion_ids` themselves so the think block survives.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Callable

import torch

from bimode.errors import UsageError
from bimode.modes import THINK_OPEN, ThinkingMode, parse_response
from bimode.scoring import accuracy_reward
from bimode.train.bpo import core as bpo_core
from bimode.train.bpo.rollouts import batches_in

logger = logging.getLogger(__name__)


def _texts(tokenizer, completion_ids) -> list[str]:
    # Completions start right after the prompt's `<think>`; put it back so the response parses.
    return [THINK_OPEN + tokenizer.decode(ids, skip_special_tokens=False).split(tokenizer.eos_token)[0]
            for ids in completion_ids]


def _column(kwargs: dict, name: str, n: int) -> list:
    values = kwargs.get(name)
    return list(values) if values is not None else [None] * n


def make_accuracy_reward(tokenizer) -> Callable:
    """1.0 when the final answer (after `</think>`) matches the record's `answer`, else 0.0."""

    def accuracy(prompts, completions, completion_ids, **kwargs) -> list[float]:
        texts = _texts(tokenizer, completion_ids)
        n = len(texts)
        return [accuracy_reward(t, a or "", kind, ch) for t, a, kind, ch in zip(
            texts, _column(kwargs, "answer", n), _column(kwargs, "answer_type", n), _column(kwargs, "choices", n))]

    return accuracy


def make_format_reward(tokenizer) -> Callable:
    """1.0 for a well-formed response (a closed think block, then a non-empty answer), else 0.0.

    A collapse risk: it pays every rollout the same when the model already writes the format, and pays
    short answers as much as correct ones, so weight it well below accuracy (or leave it off).
    """

    def format_ok(prompts, completions, completion_ids, **kwargs) -> list[float]:
        out = []
        for text in _texts(tokenizer, completion_ids):
            parsed = parse_response(text)
            out.append(float(parsed.mode in (ThinkingMode.THINK, ThinkingMode.NO_THINK) and bool(parsed.answer.strip())))
        return out

    return format_ok


def make_thinking_cost(per_token: float, per_think: float) -> Callable:
    """The cost of thinking as a reward (bpo_core.thinking_cost): minus `per_token` per thinking token, minus
    `per_think` for a rollout that thought, from the `thinking_tokens` and `taken_mode` columns BPO's rollouts
    pass to reward functions. Summed with accuracy before the group normalization, so where both modes are
    right the direct answer wins."""

    def thinking_cost(prompts, completions, completion_ids, **kwargs) -> list[float]:
        n = len(completion_ids)
        tokens = torch.tensor([t or 0 for t in _column(kwargs, "thinking_tokens", n)], dtype=torch.float32)
        thought = torch.tensor([m == ThinkingMode.THINK.value for m in _column(kwargs, "taken_mode", n)])
        return bpo_core.thinking_cost(tokens, thought, per_token, per_think).tolist()

    return thinking_cost


def import_reward(path: str) -> Callable:
    """A user reward function from `package.module:function` (or `package.module.function`)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise UsageError(f"reward {path!r}: expected 'package.module:function'")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"reward {path!r} cannot be imported: {exc}") from exc
    if not callable(func):
        raise UsageError(f"reward {path!r} is not callable")
    return func


class GuardedReward:
    """Calls a reward function; where it raises or returns a non-number, the rollout scores 0 and is counted.

    `None` (or NaN) is TRL's "cannot score this rollout": it is passed on as None, so TRL leaves the rollout
    out of this reward (and out of the group statistics when no reward scores it), and counted apart.
    A batch that raises is retried one rollout at a time, so one bad rollout does not zero its neighbours.
    `failures` counts the rollouts scored 0 this way over the run, `unscorable` the None ones. The values go
    back with the rollouts: into the RolloutBatch that BPO's rollout hands every reward (rollouts.py).
    """

    def __init__(self, func: Callable, name: str | None = None):
        self.func = func
        self.__name__ = name or getattr(func, "__name__", type(func).__name__)
        self.failures = 0
        self.unscorable = 0

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        n = len(completion_ids)
        try:
            values = self._clean(self.func(prompts=prompts, completions=completions,
                                           completion_ids=completion_ids, **kwargs), n)
        except Exception as exc:
            logger.warning("reward %s failed on a batch (%s: %s); scoring rollouts one by one",
                           self.__name__, type(exc).__name__, exc)
            values = [self._one(i, prompts, completions, completion_ids, kwargs) for i in range(n)]
        log_metric = kwargs.get("log_metric")
        self.unscorable += sum(v is None for v in values)
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/failures", float(self.failures))
            log_metric(f"rewards/{self.__name__}/unscorable", float(self.unscorable))
        for batch in batches_in(kwargs):
            batch.record_rewards(self.__name__, values)
        return values

    def _clean(self, values, n: int) -> list[float | None]:
        values = list(values)
        if len(values) != n:
            raise ValueError(f"returned {len(values)} rewards for {n} rollouts")
        out = []
        for v in values:
            try:
                value = None if v is None else float(v)
            except (TypeError, ValueError):
                self.failures += 1
                value = 0.0
            out.append(None if value is None or math.isnan(value) else value)
        return out

    def _one(self, i, prompts, completions, completion_ids, kwargs) -> float | None:
        row_kwargs = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completion_ids) else v)
                      for k, v in kwargs.items()}
        try:
            return self._clean(self.func(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                                         completion_ids=completion_ids[i:i + 1], **row_kwargs), 1)[0]
        except Exception:
            self.failures += 1
            return 0.0


def weighted_rewards(per_func: list[list[float | None]], weights: list[float]) -> torch.Tensor:
    """Each rollout's total reward as TRL computes it: the weighted sum over the rewards that scored it,
    NaN where none did (unscorable)."""
    table = torch.tensor([[math.nan if v is None else v for v in values] for values in per_func],
                         dtype=torch.float32).T  # (rollouts, functions)
    total = (table * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)
    total[table.isnan().all(dim=1)] = math.nan
    return total


def build_rewards(names: list[str], tokenizer) -> list[GuardedReward]:
    """`accuracy`, `format` or an import path, each wrapped in the guard."""
    builtin = {"accuracy": make_accuracy_reward, "format": make_format_reward}
    out = []
    for name in names:
        if name in builtin:
            out.append(GuardedReward(builtin[name](tokenizer), name))
        else:
            out.append(GuardedReward(import_reward(name), name.replace(":", ".")))
    return out
