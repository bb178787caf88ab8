"""Learning the decision per query (docs/bpo.md, "Learning the decision per query"): the decoupled decision loss and
the supervised decision target, as pure functions and in the trainer."""

import math

import pytest
import torch

from bimode.compat.trl_api import LossLogps
from bimode.train.bpo.decision import (decision_cross_entropy, decision_env_mask, decision_target_weights,
                                       decoupled_decision_loss, hard_decision_target, majority_decision_target,
                                       soft_decision_target)

from tests.helpers.bpo_helpers import LastLogged, trained_p_think_drop
from tests.unit.test_bpo import ROWS, decision_grads, make_trainer

THINKS = torch.tensor([True, True, False, False] * 2)  # 2 groups of 2g = 4: thinking half first
NAN = float("nan")


# ---- pure parts -------------------------------------------------------------------------------------
def test_the_hard_target_thinks_where_thinking_beats_the_direct_answer_by_more_than_the_margin():
    think, direct = torch.tensor([1.0, 0.5, 1.0, NAN, 0.0]), torch.tensor([1.0, 0.25, 0.0, 1.0, 0.0])
    hard = hard_decision_target(think, direct, margin=0.1)
    assert hard[:3].tolist() == [0.0, 1.0, 1.0] and math.isnan(hard[3]) and hard[4] == 0.0  # ties go direct
    assert hard_decision_target(think, direct, margin=0.5)[:3].tolist() == [0.0, 0.0, 1.0]
    soft = soft_decision_target(think, direct, margin=0.1, temperature=0.1)
    expected = [1 / (1 + math.exp(-x)) for x in (-1.0, 1.5, 9.0)]
    assert soft[:3].tolist() == pytest.approx(expected) and math.isnan(soft[3])


def test_the_majority_target_thinks_only_where_thinking_wins_the_vote_and_the_direct_answer_loses_it():
    think = torch.tensor([1.0, 1.0, 1.0, 0.25, 0.5, NAN])
    direct = torch.tensor([0.75, 0.5, 0.25, 0.0, 0.0, 0.0])
    majority = majority_decision_target(think, direct)
    # 3 of 4 and 2 of 4 direct answers right: greedy would be right, so direct, where hard (margin 0.1) thinks
    assert majority[:5].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0] and math.isnan(majority[5])
    assert hard_decision_target(think, direct, margin=0.1)[:2].tolist() == [1.0, 1.0]
    assert majority_decision_target(think, direct, margin=0.9, temperature=5.0)[:5].tolist() == majority[:5].tolist()


def test_target_weights_put_y_on_the_thinking_rollouts_and_1_minus_y_on_the_direct_ones():
    # group 1: thinking right, direct wrong -> think; group 2: both right -> direct (a tie)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    weights, y = decision_target_weights(rewards, THINKS, 4, "hard", margin=0.1)
    assert y.tolist() == [1.0, 0.0] and weights.tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    # a query whose direct rollouts all failed to score has no target: its rollouts weigh nothing
    rewards[6:] = NAN
    weights, y = decision_target_weights(rewards, THINKS, 4, "soft", margin=0.1)
    assert weights[:4].tolist() == pytest.approx([y[0].item()] * 2 + [1 - y[0].item()] * 2) and math.isnan(y[1])
    assert weights[4:].tolist() == [0.0] * 4


def test_the_cross_entropy_is_the_targets_against_the_decision_and_least_at_p_think_equal_to_it():
    p_think, y = 0.8, 0.7
    logps = torch.log(torch.tensor([p_think] * 2 + [1 - p_think] * 2))
    weights = torch.tensor([y, y, 1 - y, 1 - y])
    ce = decision_cross_entropy(logps, weights, torch.ones(4))
    assert ce.item() == pytest.approx(-y * math.log(p_think) - (1 - y) * math.log(1 - p_think))
    # a rollout out of the loss is out of the mean
    assert decision_cross_entropy(logps, weights, torch.tensor([1, 0, 1, 0])).item() == pytest.approx(
        2 * (y * -math.log(p_think) + (1 - y) * -math.log(1 - p_think)) / 2)

    def gradient(logits):  # two decision tokens; each rollout holds the log-prob of its own
        logits = torch.tensor(logits, requires_grad=True)
        logp = torch.log_softmax(logits, -1)
        decision_cross_entropy(torch.stack([logp[0], logp[0], logp[1], logp[1]]), weights, torch.ones(4)).backward()
        return logits.grad

    assert gradient([math.log(y), math.log(1 - y)]).abs().max().item() < 1e-6  # the fixed point: p_think = y
    assert gradient([0.0, 0.0])[0].item() < 0  # from p_think 0.5, the step raises the think logit toward 0.7


def test_the_decoupled_loss_is_one_clipped_term_per_rollout_averaged_over_rollouts():
    first = torch.log(torch.tensor([0.6, 0.6, 0.3, 0.3])).requires_grad_()
    advantages = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    loss = decoupled_decision_loss(first, first.detach(), advantages, torch.ones(4), 0.2, 0.2)
    assert loss.item() == pytest.approx(0.0)  # on policy (ratio 1): -mean(A), 0 in a normalized group
    loss.backward()
    assert first.grad.tolist() == pytest.approx([0.25, 0.25, -0.25, -0.25])  # -A / rollouts, whatever the length
    # off policy: ratio 1.5 with A > 0 is clipped at 1.2 (no gradient); with A < 0 the unclipped term counts
    first = torch.log(torch.tensor([1.5, 1.5])).requires_grad_()
    loss = decoupled_decision_loss(first, torch.zeros(2), torch.tensor([1.0, -1.0]), torch.ones(2), 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    loss.backward()
    assert first.grad[0].item() == 0.0 and first.grad[1].item() == pytest.approx(1.5 / 2)
    # the KL term (k3, as TRL's): 0 at the reference, e^d - d - 1 away from it
    kl = decoupled_decision_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.ones(1), 0.2, 0.2,
                                 ref_first_logps=torch.tensor([0.5]), beta=0.1)
    assert kl.item() == pytest.approx(0.1 * (math.exp(0.5) - 0.5 - 1))


def test_the_env_mask_takes_the_decision_token_out_of_trls_loss_under_the_decoupled_loss():
    assert decision_env_mask([1, 3], [4, 5], 0.0, False) == [[0, 1, 1, 1], [0, 0, 0, 1, 1]]  # off: every forced token
    assert decision_env_mask([1, 3], [4, 5], 0.0, True) == [[0, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert decision_env_mask([1, 3], [4, 5], 0.3, True) == [[0, 1, 1, 1], [0, 1, 1, 1, 1]]  # the decision only
    assert decision_env_mask([1, 3], [4, 5], 0.3, False) is None  # BPO's: every token in TRL's loss


def test_the_loss_log_probs_are_taken_only_when_trls_loss_scored_the_policy_once():
    seen = LossLogps()
    seen.saw(torch.zeros(1))  # outside a loss (old or reference log-probs): not kept
    with seen.watching():
        seen.saw(torch.ones(2))
    assert seen.taken().tolist() == [1.0, 1.0]
    with seen.watching():
        seen.saw(torch.ones(2))
        seen.saw(torch.ones(2))
    with pytest.raises(RuntimeError, match="scored the policy 2 times"):
        seen.taken()


@pytest.mark.parametrize("settings, message", [
    (dict(decision_loss="separate"), "decision_loss must be one of"),
    (dict(decision_target="always"), "decision_target must be one of"),
    (dict(decision_target="hard", rollout="auto"), "decision_target hard .* needs rollout bimode"),
    (dict(decision_loss="decoupled", rollout="auto"), "decision_loss decoupled .* needs rollout bimode"),
    (dict(decision_loss="decoupled", loss_type="cispo"), "not loss_type cispo"),
    (dict(decision_weight=-1.0), "decision_weight must be a finite number >= 0"),
    (dict(decision_target_weight=float("inf")), "decision_target_weight must be a finite number"),
    (dict(decision_target_temperature=0.0), "decision_target_temperature must be above 0"),
])
def test_bad_decision_settings_fail_naming_the_field(tmp_path, settings, message):
    from bimode.train.bpo.trainer import BPOConfig

    with pytest.raises(ValueError, match=message):
        BPOConfig(output_dir=str(tmp_path), use_cpu=True, **settings)


def test_the_decoupled_loss_lets_a_decision_objective_train_with_mode_token_loss_off(tmp_path):
    from bimode.train.bpo.trainer import BPOConfig

    cfg = BPOConfig(output_dir=str(tmp_path), use_cpu=True, mode_objective="decision", mode_token_loss="off",
                    decision_loss="decoupled")
    assert cfg.decision_loss == "decoupled"


# ---- the trainer ------------------------------------------------------------------------------------
DIRECT_WINS = ["tests.helpers.bpo_helpers:no_think_wins"]


def test_the_decoupled_loss_trains_the_decision_token_with_its_own_weight(tmp_path, trained_tiny,
                                                                          trained_families_file):
    """mode_token_loss off: plain BPO gives the decision no gradient (test_bpo); the decoupled term gives it one,
    scaled by decision_weight alone, and leaves the response tokens' gradient as it was."""
    one = make_trainer(trained_tiny, trained_families_file, tmp_path / "one", mode_token_loss="off",
                       decision_loss="decoupled", rewards=DIRECT_WINS)
    forced, rest = decision_grads(one)
    assert torch.all(forced > 0)
    logged = LastLogged(one)
    assert logged["bpo/decision_loss"] == pytest.approx(0.0, abs=1e-6)  # on policy: -mean(A) of a normalized group
    three, rest3 = decision_grads(make_trainer(trained_tiny, trained_families_file, tmp_path / "three",
                                               mode_token_loss="off", decision_loss="decoupled", decision_weight=3.0,
                                               rewards=DIRECT_WINS))
    assert three.tolist() == pytest.approx((3 * forced).tolist(), rel=1e-4)
    assert rest3.tolist() == pytest.approx(rest.tolist(), rel=1e-5)


def test_the_decoupled_loss_takes_the_decision_token_out_of_trls_token_count(tmp_path, trained_tiny,
                                                                             trained_families_file):
    trainer = make_trainer(trained_tiny, trained_families_file, tmp_path, mode_token_loss="on",
                           decision_loss="decoupled", mode_objective="decision", direct_margin=0.1,
                           rewards=DIRECT_WINS)
    trainer.model.train()
    output, _ = trainer.generate_and_score(ROWS)
    from bimode.train.bpo.trainer import DECISION_ADVANTAGES

    # one decision token per rollout leaves TRL's loss; the rest of the suffix stays (mode_token_loss on)
    assert output["num_items_in_batch"].item() == output["completion_mask"].sum().item() - len(ROWS)
    d = 1.0 + 0.1  # the decision objective's advantage: direct accuracy + margin - thinking accuracy
    assert output[DECISION_ADVANTAGES].tolist() == pytest.approx([-d, -d, d, d] * 2)


@pytest.mark.parametrize("reward, thinking_weight", [("no_think_wins", 0.0), ("think_wins", 1.0)])
def test_the_decision_target_trains_each_rollouts_decision_toward_its_querys_verdict(
        tmp_path, trained_tiny, trained_families_file, reward, thinking_weight):
    """mode_token_loss off, so only the target's cross-entropy reaches the decision: where thinking wins it pulls
    the thinking rollouts' decision token (weight y = 1) and not the direct ones' (1 - y = 0), and the reverse."""
    trainer = make_trainer(trained_tiny, trained_families_file, tmp_path, mode_token_loss="off",
                           decision_target="hard", direct_margin=0.1, rewards=[f"tests.helpers.bpo_helpers:{reward}"])
    forced, _ = decision_grads(trainer)
    if thinking_weight:
        assert torch.all(forced[THINKS] > 0) and torch.all(forced[~THINKS] == 0)
    else:
        assert torch.all(forced[THINKS] == 0) and torch.all(forced[~THINKS] > 0)
    logged = LastLogged(trainer)
    assert logged["bpo/decision_target/think"] == thinking_weight
    assert logged["bpo/decision_target/cross_entropy"] > 0


@pytest.mark.parametrize("target, thinking_weight", [("hard", 1.0), ("majority", 0.0)])
def test_the_majority_target_sends_a_query_direct_where_half_the_direct_answers_are_right(
        tmp_path, trained_tiny, trained_families_file, target, thinking_weight):
    """Thinking always right, direct right on one of its two rollouts: the hard target (margin 0.1) pulls the
    thinking rollouts' decision, the majority target (half right: greedy's verdict is a coin flip, not a loss)
    the direct ones'."""
    trainer = make_trainer(trained_tiny, trained_families_file, tmp_path, mode_token_loss="off",
                           decision_target=target, direct_margin=0.1,
                           rewards=["tests.helpers.bpo_helpers:half_the_direct_answers_right"])
    forced, _ = decision_grads(trainer)
    if thinking_weight:
        assert torch.all(forced[THINKS] > 0) and torch.all(forced[~THINKS] == 0)
    else:
        assert torch.all(forced[THINKS] == 0) and torch.all(forced[~THINKS] > 0)
    assert LastLogged(trainer)["bpo/decision_target/think"] == thinking_weight


def test_a_decision_target_on_ties_trains_the_decision_toward_answering_directly(tmp_path, trained_tiny,
                                                                                 trained_families_file):
    """Both modes always right: the paper's BPO does not move p_think (test_thinking_cost); the hard target
    (a tie goes direct) moves it down within three steps."""
    trainer = make_trainer(trained_tiny, trained_families_file, tmp_path, max_steps=3, learning_rate=3e-3,
                           rewards=["tests.helpers.bpo_helpers:always_right"], probe_size=24,
                           decision_target="hard", max_completion_length=8)
    drop, before, after = trained_p_think_drop(trainer)
    assert drop > 0.1, (before, after)
