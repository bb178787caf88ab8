"""The bi-mode parts of BPO as small framework-free functions (docs/r4b.md, section 6).

TRL's GRPOTrainer does the PPO-clipped loss and the group normalization; BPO differs from GRPO in which
rollouts share a group (g forced thinking + g forced non-thinking for every prompt, normalized together) and
in what the forced mode tokens contribute to the loss. Those two differences live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bimode.errors import UsageError
from bimode.modes import ThinkingMode

# rollout name -> layout(offset, n, num_generations): the mode of each of n local rollouts (verl's
# core_algos style: a new rollout scheme is one registered function, the trainer looks it up by name)
ROLLOUT_LAYOUTS: dict[str, Callable[[int, int, int], list[ThinkingMode]]] = {}


def register_rollout(name: str):
    def register(layout: Callable[[int, int, int], list[ThinkingMode]]):
        ROLLOUT_LAYOUTS[name] = layout
        return layout
    return register


@register_rollout("bimode")
def bimode_layout(offset: int, n: int, num_generations: int) -> list[ThinkingMode]:
    """BPO: the first half of every group of 2g thinks, the second half does not, normalized together.

    TRL lays a generation batch out as consecutive groups of `num_generations` rollouts of one prompt and may
    split a group across processes, so the mode follows the global position `offset + i`, not the local one.
    """
    if num_generations % 2:
        raise UsageError(f"bi-mode rollouts need an even num_generations (2g), got {num_generations}")
    g = num_generations // 2
    return [ThinkingMode.THINK if (offset + i) % num_generations < g else ThinkingMode.NO_THINK
            for i in range(n)]


@register_rollout("auto")
def auto_layout(offset: int, n: int, num_generations: int) -> list[ThinkingMode]:
    """Plain GRPO in auto mode (the paper's baseline): the model chooses its mode in every rollout."""
    return [ThinkingMode.AUTO] * n


def rollout_modes(offset: int, n: int, num_generations: int, rollout: str = "bimode") -> list[ThinkingMode]:
    """The mode of each of n local rollouts starting at global position `offset`, by the named layout."""
    if rollout not in ROLLOUT_LAYOUTS:
        raise UsageError(f"rollout must be one of {tuple(ROLLOUT_LAYOUTS)}, not {rollout!r}")
    return ROLLOUT_LAYOUTS[rollout](offset, n, num_generations)


def parse_mode_token_loss(value) -> float:
    """`off` -> 0.0, `on` -> 1.0, a number in (0, 1) -> itself: the loss weight of the forced mode tokens."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("off", "false", "no"):
            return 0.0
        if text in ("on", "true", "yes"):
            return 1.0
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"mode_token_loss must be off, on or a weight in (0, 1), not {value!r}") from None
    weight = float(value)
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"mode_token_loss weight must be in [0, 1], got {weight}")
    return weight


def mode_token_weights(suffix_lengths: list[int], width: int, weight: float) -> torch.Tensor:
    """Per-token loss weights (rows x width): `weight` on each row's leading forced mode tokens, 1 elsewhere.

    The forced suffix (`\\n` for thinking, `\\n\\n</think>\\n\\n` for non-thinking, after the prompt's
    `<think>`) opens every completion; its first token is the auto-mode decision.
    """
    weights = torch.ones(len(suffix_lengths), width)
    for row, length in enumerate(suffix_lengths):
        weights[row, :min(length, width)] = weight
    return weights


def forced_env_mask(suffix_lengths: list[int], completion_lengths: list[int]) -> list[list[int]]:
    """mode_token_loss off: per completion token, 0 on the forced mode tokens and 1 on the rest. A rollout
    returns it as TRL's `env_mask` (tokens the model did not choose), and TRL then leaves them out of the loss
    and of the token count it divides by."""
    return [[0] * min(forced, n) + [1] * max(n - forced, 0) for forced, n in zip(suffix_lengths, completion_lengths)]


def mode_token_loss(advantages: torch.Tensor, completion_mask: torch.Tensor, suffix_lengths: list[int],
                    weight: float, forced_advantages: torch.Tensor | None = None) -> torch.Tensor:
    """The advantages TRL's loss takes, with what the forced mode tokens contribute.

    advantages: (B,) one A per rollout; completion_mask: (B, T) 1 on the completion's tokens;
    suffix_lengths: B forced-suffix lengths (each completion starts with its forced suffix);
    forced_advantages: (B,) what the forced tokens carry instead of A (a mode objective's decision advantage,
    see `decision_advantages`; None: A itself).
    Returns: weight 1 -> A (B,), unchanged; 0 < weight < 1 -> A x per-token weights (B, T); weight 0 -> A
    unchanged: the forced tokens leave the loss through the rollout's env_mask (`forced_env_mask`), since an
    advantage times 0 would still count them in the loss's token mean.
    With forced_advantages (and weight > 0), the forced tokens carry weight x F and the rest A, as (B, T).
    """
    if weight == 0.0 or (weight >= 1.0 and forced_advantages is None):
        return advantages
    device = completion_mask.device
    forced = (mode_token_weights(suffix_lengths, completion_mask.size(1), 0.0) == 0).to(device)
    rest = advantages.reshape(-1, 1)
    carried = rest if forced_advantages is None else forced_advantages.reshape(-1, 1).to(rest)
    return torch.where(forced, weight * carried, rest)


# ---- what thinking costs (beyond R-4B's accuracy-only reward; docs/bpo.md, "A cost of thinking") ----------
# A mode objective decides what the forced mode tokens (the auto-mode decision) are trained towards. "bpo" is
# the paper's: the rollout's own advantage A. Others compute a decision advantage from the two forced groups of
# each query, which hold both modes' outcomes: the information a router needs.
MODE_OBJECTIVES: dict[str, Callable[..., DecisionSignal | None]] = {}


def register_mode_objective(name: str):
    def register(objective):
        MODE_OBJECTIVES[name] = objective
        return objective
    return register


@dataclass(frozen=True)
class DecisionSignal:
    """A mode objective's output: the forced tokens' advantage per rollout (B,) and whether the direct
    answer wins its query's decision, per group (B / 2g,)."""
    forced_advantages: torch.Tensor
    direct_wins: torch.Tensor


def mode_group_means(rewards: torch.Tensor, thinks: torch.Tensor, num_generations: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of `num_generations` consecutive rollouts: (mean reward of its thinking rollouts, of its
    direct ones), NaN rewards (unscorable rollouts) left out; NaN where a group has no scorable rollout of a
    mode."""
    r = rewards.float().reshape(-1, num_generations)
    t = thinks.bool().reshape(-1, num_generations)
    scored = ~torch.isnan(r)
    value = torch.nan_to_num(r)

    def mean(pick):
        count = (pick & scored).sum(1)
        total = (value * (pick & scored)).sum(1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    return mean(t), mean(~t)


@register_mode_objective("bpo")
def bpo_objective(rewards: torch.Tensor, thinks: torch.Tensor, num_generations: int, margin: float = 0.0,
                  scale: float = 1.0) -> DecisionSignal | None:
    """R-4B's BPO: the forced tokens carry their rollout's advantage like every other token (None: nothing to
    replace)."""
    return None


@register_mode_objective("decision")
def decision_advantages(rewards: torch.Tensor, thinks: torch.Tensor, num_generations: int, margin: float = 0.0,
                        scale: float = 1.0) -> DecisionSignal:
    """A decision-level objective in the spirit of AdaptThink (arXiv 2505.13417): prefer the direct answer
    unless thinking is worth more than `margin` of accuracy on this query.

    AdaptThink maximizes the share of direct answers subject to accuracy not falling below the reference's;
    its Lagrangian gives a direct answer the advantage R + margin - R_ref. Here both expectations come from
    the query's own forced groups: the decision advantage of answering directly is
        d = mean reward (direct) + margin - mean reward (thinking),
    and of thinking -d, times `scale` (its size against the response tokens' normalized advantage). Only the
    forced mode tokens carry it, so the response tokens keep BPO's own advantage (Thinkless' decoupling of
    the mode decision from the response, arXiv 2505.13379).
    A query whose rollouts of one mode all failed to score gets 0 (no decision signal).
    """
    think_mean, direct_mean = mode_group_means(rewards, thinks, num_generations)
    gap = torch.nan_to_num(direct_mean + margin - think_mean, nan=0.0)
    per_rollout = scale * gap.repeat_interleave(num_generations)
    forced = torch.where(thinks.bool().reshape(-1).to(per_rollout.device), -per_rollout, per_rollout)
    return DecisionSignal(forced, direct_mean + margin >= think_mean)


def thinking_cost(thinking_tokens: torch.Tensor, thought: torch.Tensor, per_token: float = 0.0,
                  per_think: float = 0.0) -> torch.Tensor:
    """The reward a rollout loses for thinking (a cost in the reward, as length-penalised rewards do):
    `per_token` for each thinking token and `per_think` once if it thought at all. Returned as a
    negative reward, to be summed with accuracy before BPO's group normalization."""
    return -(per_token * thinking_tokens.float() + per_think * thought.float())


def response_mode(completion_ids: list[int], think_ids, no_think_ids) -> str:
    """Which mode a completion that starts right after `<think>` took: think, no_think or malformed."""
    if not completion_ids:
        return "malformed"
    if completion_ids[0] in think_ids:
        return "think"
    if completion_ids[0] in no_think_ids:
        return "no_think"
    return "malformed"


def per_mode_stats(modes: list[str], rewards: torch.Tensor, advantages: torch.Tensor,
                   lengths: torch.Tensor, thinking_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Mean reward, advantage, generated length and thinking tokens (bimode.generation.types.token_counts)
    of the think and no_think rollouts, and the think share."""
    stats: dict[str, float] = {}
    for name in (ThinkingMode.THINK, ThinkingMode.NO_THINK):
        pick = torch.tensor([m == name for m in modes], dtype=torch.bool)
        if pick.any():
            stats[f"{name}/reward"] = rewards[pick].float().nanmean().item()
            stats[f"{name}/advantage"] = advantages[pick].float().mean().item()
            stats[f"{name}/length"] = lengths[pick].float().mean().item()
            if thinking_tokens is not None:
                stats[f"{name}/thinking_tokens"] = thinking_tokens[pick].float().mean().item()
    if modes:
        stats["think_share"] = sum(m == ThinkingMode.THINK for m in modes) / len(modes)
    return stats
