"""Learning the auto-mode decision per query (issue 37; docs/bpo.md, "Learning the decision per query").

The decision is the first token after `<think>`: the forced suffix's first token in every BPO rollout (`\\n` for
thinking, `\\n\\n` for not). Two options of BPO train it apart from the response tokens, both terms added to TRL's
loss by the trainer from the log-probs TRL scored the completions with (`BPOTrainer.compute_loss`):

- a decoupled decision loss (Thinkless' DeGRPO, arXiv 2505.13379): the decision token's PPO-clipped term averaged
  over rollouts on its own, with its own weight, instead of being one token among a completion's;
- a supervised decision target from the query's own forced groups (as ThinkSwitcher trains its switch on the two
  modes' pass rates, arXiv 2505.14183): a cross-entropy that pulls the decision toward "think" exactly where
  thinking's accuracy beats the direct answer's by more than a margin (hard, soft), or where thinking's majority
  verdict is right and the direct answer's is not (majority: what greedy decoding would see).
"""

from __future__ import annotations

from typing import Callable

import torch

from bimode.train.bpo.core import forced_env_mask, mode_group_means

DECISION_LOSSES = ("tokens", "decoupled")  # tokens: the decision is one completion token among the rest (BPO's)

# target name -> target(think_accuracy, direct_accuracy, margin, temperature): per query, the probability of
# thinking the decision is trained toward (NaN where the query has no target)
DECISION_TARGETS: dict[str, Callable[..., torch.Tensor]] = {}


def register_decision_target(name: str):
    def register(target):
        DECISION_TARGETS[name] = target
        return target
    return register


def _unknown(think_accuracy: torch.Tensor, direct_accuracy: torch.Tensor) -> torch.Tensor:
    return torch.isnan(think_accuracy) | torch.isnan(direct_accuracy)


@register_decision_target("hard")
def hard_decision_target(think_accuracy: torch.Tensor, direct_accuracy: torch.Tensor, margin: float = 0.0,
                         temperature: float = 0.1) -> torch.Tensor:
    """1 (think) where thinking's accuracy beats the direct answer's by more than `margin`, else 0: at margin 0 the
    oracle router's rule (eval.metrics.oracle_choice: a tie, both right or both wrong, goes direct). NaN where a
    mode has no scorable rollout."""
    target = (think_accuracy - direct_accuracy > margin).float()
    return torch.where(_unknown(think_accuracy, direct_accuracy), torch.full_like(target, float("nan")), target)


@register_decision_target("soft")
def soft_decision_target(think_accuracy: torch.Tensor, direct_accuracy: torch.Tensor, margin: float = 0.0,
                         temperature: float = 0.1) -> torch.Tensor:
    """sigmoid((thinking's accuracy - the direct answer's - margin) / temperature): near the hard target where the
    gap is clear, unsure where it is within about a temperature of the margin (a tie sits at sigmoid(-margin / T),
    so a margin above 0 leans ties direct). NaN where a mode has no scorable rollout."""
    return torch.sigmoid((think_accuracy - direct_accuracy - margin) / temperature)  # NaN stays NaN


@register_decision_target("majority")
def majority_decision_target(think_accuracy: torch.Tensor, direct_accuracy: torch.Tensor, margin: float = 0.0,
                             temperature: float = 0.1) -> torch.Tensor:
    """The oracle router's rule on each forced group's majority verdict: 1 (think) where at least half the thinking
    rollouts are right and fewer than half the direct ones, else 0. Greedy decoding (what auto mode and the
    eval run) answers with the likeliest answer, which a majority of samples approximates; the hard target reads
    the sampled accuracies themselves, so a direct answer right on 3 of 4 samples (greedy: right) loses to a
    thinking group right on 4 of 4 and the query is sent to think. margin and temperature are not used. NaN where
    a mode has no scorable rollout."""
    target = ((think_accuracy >= 0.5) & (direct_accuracy < 0.5)).float()
    return torch.where(_unknown(think_accuracy, direct_accuracy), torch.full_like(target, float("nan")), target)


def decision_target_weights(rewards: torch.Tensor, thinks: torch.Tensor, num_generations: int, target: str,
                            margin: float = 0.0, temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rollout of the gathered batch (groups of `num_generations`, both modes in each), the weight of its own
    decision token's log-prob in the cross-entropy: y on a thinking rollout, 1 - y on a direct one, where y is the
    query's target (`DECISION_TARGETS[target]` from its two forced groups' mean task rewards); 0 for every rollout
    of a query without a target. Returns (weights (B,), y per query (B / num_generations,), NaN where none)."""
    think_accuracy, direct_accuracy = mode_group_means(rewards, thinks, num_generations)
    y = DECISION_TARGETS[target](think_accuracy, direct_accuracy, margin, temperature)
    per_rollout = torch.nan_to_num(y, nan=0.0).repeat_interleave(num_generations)
    known = (~torch.isnan(y)).float().repeat_interleave(num_generations)
    thinking = thinks.bool().reshape(-1).to(per_rollout.device)
    return torch.where(thinking, per_rollout, 1.0 - per_rollout) * known, y


def decision_cross_entropy(first_logps: torch.Tensor, weights: torch.Tensor, included: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of the decision against its target, estimated from rollouts that each hold one side of it.

    first_logps: (B,) each rollout's log-prob of its forced first token (log p_think on a thinking rollout, log
    p_no_think on a direct one, under the full next-token distribution); weights: (B,) from
    `decision_target_weights`; included: (B,) 1 for rollouts in the loss.
    A query's rollouts are half thinking, half direct, so 2 x the mean of weight x -log-prob over them is
        H(y, p) = -y log p_think - (1 - y) log p_no_think,
    whose minimum is p_think = y, p_no_think = 1 - y: the decision bimode's generation takes (p_think renormalised
    over the two, generation.rows.decision_probs) then equals the target, and the probability on any other first
    token (the leak docs/bpo.md warns of) goes to 0. Unlike a policy gradient (+d / -d on the two decisions,
    `core.decision_advantages`), it has a fixed point short of certainty when the target is soft.
    """
    included = included.float()
    total = (2.0 * weights.to(first_logps) * -first_logps * included).sum()
    return total / included.sum().clamp(min=1.0)


def decoupled_decision_loss(first_logps: torch.Tensor, old_first_logps: torch.Tensor, advantages: torch.Tensor,
                            included: torch.Tensor, epsilon_low: float, epsilon_high: float,
                            ref_first_logps: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """DeGRPO's control-token term (Thinkless, arXiv 2505.13379): per rollout, the PPO-clipped surrogate of its
    decision token, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) with r = exp(log-prob - old log-prob), plus
    beta x the k3 KL estimate to the reference where beta > 0 (as TRL adds it per token), averaged over the
    included rollouts: one term per rollout whatever its length, where inside the completion's loss the decision
    is one token of many (and a long trace's decision counts less than a short answer's under per-sequence
    normalization). All inputs (B,)."""
    ratio = torch.exp(first_logps - old_first_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    a = advantages.to(first_logps)
    per_row = -torch.min(ratio * a, clipped * a)
    if beta and ref_first_logps is not None:
        delta = ref_first_logps - first_logps
        per_row = per_row + beta * (torch.exp(delta) - delta - 1)
    included = included.float()
    return (per_row * included).sum() / included.sum().clamp(min=1.0)


def decision_env_mask(suffix_lengths: list[int], completion_lengths: list[int], mode_weight: float,
                      decoupled: bool) -> list[list[int]] | None:
    """TRL's env_mask for a bimode rollout batch (0: out of TRL's loss and its token count), or None for none:
    every forced token with mode_token_loss off; with the decoupled decision loss at least the decision token,
    which its own term trains (the rest of the suffix as mode_token_loss says)."""
    if mode_weight == 0.0:
        masked = suffix_lengths
    elif decoupled:
        masked = [min(n, 1) for n in suffix_lengths]
    else:
        return None
    return forced_env_mask(masked, completion_lengths)
