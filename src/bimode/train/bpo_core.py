"""The bi-mode parts of BPO as small framework-free functions (docs/r4b.md, section 6).

TRL's GRPOTrainer does the PPO-clipped loss and the group normalization; BPO differs from GRPO in which
rollouts share a group (g forced thinking + g forced non-thinking for every prompt, normalized together) and
in what the forced mode tokens contribute to the loss. Those two differences live here.
"""

from __future__ import annotations

from typing import Callable

import torch

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
        raise ValueError(f"bi-mode rollouts need an even num_generations (2g), got {num_generations}")
    g = num_generations // 2
    return [ThinkingMode.THINK if (offset + i) % num_generations < g else ThinkingMode.NO_THINK
            for i in range(n)]


@register_rollout("auto")
def auto_layout(offset: int, n: int, num_generations: int) -> list[ThinkingMode]:
    """Plain GRPO in auto mode (the paper's baseline): the model chooses its mode in every rollout."""
    return [ThinkingMode.AUTO] * n


ROLLOUTS = tuple(ROLLOUT_LAYOUTS)


def rollout_modes(offset: int, n: int, num_generations: int, rollout: str = "bimode") -> list[ThinkingMode]:
    """The mode of each of n local rollouts starting at global position `offset`, by the named layout."""
    if rollout not in ROLLOUT_LAYOUTS:
        raise ValueError(f"rollout must be one of {tuple(ROLLOUT_LAYOUTS)}, not {rollout!r}")
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
            raise ValueError(f"mode_token_loss must be off, on or a weight in (0, 1), not {value!r}") from None
    weight = float(value)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mode_token_loss weight must be in [0, 1], got {weight}")
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


def mode_token_loss(advantages: torch.Tensor, completion_mask: torch.Tensor, suffix_lengths: list[int],
                    weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the forced mode tokens contribute to the loss, as the two inputs TRL's loss takes.

    advantages: (B,) one A per rollout; completion_mask: (B, T) 1 on the completion's tokens;
    suffix_lengths: B forced-suffix lengths (each completion starts with its forced suffix).
    Returns (advantages, keep): weight 1 -> (A (B,), None), unchanged; 0 < weight < 1 -> (A x per-token
    weights (B, T), None); weight 0 -> (A (B,), keep (B, T)), a 0/1 mask that takes the forced tokens out of
    the loss and out of its token count (their advantage times 0 would still count them in the mean).
    """
    if weight >= 1.0:
        return advantages, None
    weights = mode_token_weights(suffix_lengths, completion_mask.size(1), weight).to(completion_mask.device)
    if weight == 0.0:
        return advantages, (weights > 0).to(completion_mask.dtype)
    return advantages.reshape(-1, 1) * weights, None


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
