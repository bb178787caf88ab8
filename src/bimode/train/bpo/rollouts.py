"""What BPO's rollout knows about each rollout, carried in the rollout's return value (docs/bpo.md).

TRL 1.16's `rollout_func` returns `prompt_ids`, `completion_ids` and `logprobs`; every other field is handed to
the reward functions. BPO's rollout adds the columns rewards read (`rollout_mode`, `taken_mode`,
`thinking_tokens`) and one `RolloutBatch` under `ROLLOUT_FIELD`: the forced mode, forced-suffix length, sampled
length, thinking tokens and taken mode of each rollout, and, filled in by bimode's reward guard as TRL scores the
rollouts, each reward's values. The trainer reads the batch back after TRL's step to weight the forced tokens'
advantage and log per mode; nothing travels in trainer attributes set for a later call to find.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.generation.types import Prompt
from bimode.modes import ThinkingMode

ROLLOUT_FIELD = "bimode_rollouts"


@dataclass(repr=False)
class RolloutBatch:
    """One process's rollouts of one generation step, in TRL's order."""

    modes: list[ThinkingMode]  # the forced mode (AUTO where the rollout chose: `rollout: auto`)
    suffix_lengths: list[int]  # forced mode tokens opening each completion
    generated_lengths: list[int]  # sampled tokens: the forced suffix and the end token not counted
    thinking_tokens: list[int]
    taken: list[str]  # the mode the response took: think, no_think or malformed (core.response_mode)
    rewards: dict[str, list[float | None]] = field(default_factory=dict)  # reward name -> one value per rollout

    def __len__(self) -> int:
        return len(self.modes)

    def __repr__(self) -> str:  # TRL prints reward kwargs when a row is unscorable: keep it one line
        return f"RolloutBatch({len(self)} rollouts, rewards {sorted(self.rewards)})"

    def reward_columns(self) -> dict:
        """The extra fields of rollout_func's output: columns for reward functions, and the batch itself."""
        return {"rollout_mode": [m.value for m in self.modes], "taken_mode": list(self.taken),
                "thinking_tokens": list(self.thinking_tokens), ROLLOUT_FIELD: self}

    def record_rewards(self, name: str, values: list[float | None]) -> None:
        if len(values) != len(self):
            raise ValueError(f"reward {name}: {len(values)} values for {len(self)} rollouts")
        self.rewards[name] = list(values)

    def rewards_of(self, names: list[str]) -> list[list[float | None]]:
        """Each named reward's values; a reward that never scored this batch is a bug, said by name."""
        missing = [n for n in names if n not in self.rewards]
        if missing:
            raise RuntimeError(f"rewards {missing} did not score this rollout batch (scored: {sorted(self.rewards)}); "
                               "every BPO reward must be wrapped in rewards.GuardedReward")
        return [self.rewards[n] for n in names]


def batches_in(reward_kwargs: dict) -> list[RolloutBatch]:
    """The rollout batches among a reward call's keyword arguments (TRL passes the field once per rollout)."""
    unique = {id(b): b for b in reward_kwargs.get(ROLLOUT_FIELD) or [] if isinstance(b, RolloutBatch)}
    return list(unique.values())


def group_prompts(prompts: list[list[dict]], modes: list[ThinkingMode]) -> list[Prompt]:
    """The rollouts TRL asks for (each prompt's messages once per rollout, images in their blocks) as engine
    prompts: consecutive rollouts of one conversation become one Prompt with their modes, so the engine runs
    the prompt once for them."""
    out: list[Prompt] = []
    previous = None
    for messages, mode in zip(prompts, modes, strict=True):
        if out and messages == previous:
            out[-1].modes.append(mode)
        else:
            out.append(Prompt.from_chat(messages, [mode]))
            previous = messages
    return out
