"""A cost of thinking in BPO (docs/bpo.md, "A cost of thinking"): the decision objective and the cost in the
reward, as pure functions and in the trainer."""

import json
import math

import pytest
import torch

from bimode.train.bpo import core as bpo_core
from bimode.train.bpo.core import decision_advantages, mode_group_means, mode_token_loss, thinking_cost
from bimode.train.bpo.rewards import make_thinking_cost

from tests.helpers.bpo_helpers import LastLogged, trained_p_think_drop
from tests.unit.test_bpo import ROWS, make_trainer

THINKS = torch.tensor([True, True, False, False] * 2)  # 2 groups of 2g = 4: thinking half first


# ---- pure parts -------------------------------------------------------------------------------------
def test_the_decision_advantage_is_direct_accuracy_plus_margin_minus_thinking_accuracy():
    # group 1: both modes always right; group 2: thinking right, direct right half the time
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    signal = decision_advantages(rewards, THINKS, 4, margin=0.2)
    d1, d2 = 0.2, 0.5 + 0.2 - 1.0
    assert signal.forced_advantages.tolist() == pytest.approx([-d1, -d1, d1, d1, -d2, -d2, d2, d2])
    assert signal.direct_wins.tolist() == [True, False]
    # a margin as large as the gap makes the direct answer win the tie
    assert decision_advantages(rewards, THINKS, 4, margin=0.5).direct_wins.tolist() == [True, True]
    scaled = decision_advantages(rewards, THINKS, 4, margin=0.2, scale=4.0)
    assert scaled.forced_advantages.tolist() == pytest.approx((4 * signal.forced_advantages).tolist())
    assert scaled.direct_wins.tolist() == signal.direct_wins.tolist()


def test_a_mode_with_no_scorable_rollout_gives_its_query_no_decision_signal():
    rewards = torch.tensor([1.0, math.nan, 0.0, 1.0, 1.0, 1.0, math.nan, math.nan])
    think, direct = mode_group_means(rewards, THINKS, 4)
    assert think.tolist() == [1.0, 1.0] and direct[0].item() == 0.5 and math.isnan(direct[1].item())
    signal = decision_advantages(rewards, THINKS, 4)
    assert signal.forced_advantages[4:].tolist() == [0.0] * 4
    assert signal.direct_wins.tolist() == [False, False]


def test_the_paper_objective_leaves_the_forced_tokens_their_own_advantage():
    assert bpo_core.MODE_OBJECTIVES["bpo"](torch.ones(8), THINKS, 4) is None


def test_thinking_cost_charges_per_token_and_per_thinking_rollout():
    cost = thinking_cost(torch.tensor([10, 0, 3]), torch.tensor([True, False, True]), per_token=0.01, per_think=0.2)
    assert cost.tolist() == pytest.approx([-0.3, 0.0, -0.23])
    reward = make_thinking_cost(0.01, 0.2)
    assert reward(prompts=[None] * 2, completions=[None] * 2, completion_ids=[[1], [2]],
                  thinking_tokens=[10, 0], taken_mode=["think", "no_think"]) == pytest.approx([-0.3, 0.0])


def test_forced_tokens_carry_the_decision_advantage_and_the_rest_the_rollouts():
    advantages, forced = torch.tensor([1.0, -1.0]), torch.tensor([0.3, -0.3])
    mask = torch.ones(2, 5)
    per_token = mode_token_loss(advantages, mask, [1, 3], 1.0, forced)
    assert per_token.tolist() == pytest.approx(torch.tensor([[0.3, 1, 1, 1, 1], [-0.3, -0.3, -0.3, -1, -1]]))
    per_token = mode_token_loss(advantages, mask, [1, 3], 0.5, forced)
    assert per_token[:, 0].tolist() == pytest.approx([0.15, -0.15]) and per_token[1, 3].item() == -1.0
    # without a decision advantage the weighted form is what it was: A x weight on the forced tokens
    per_token = mode_token_loss(advantages, mask, [1, 3], 0.5)
    assert per_token.tolist() == [[0.5, 1, 1, 1, 1], [-0.5, -0.5, -0.5, -1, -1]]  # exact: halves


def test_a_mode_objective_registered_after_import_is_accepted(tmp_path):
    from bimode.train.bpo.trainer import BPOConfig

    name = "test_always_direct"
    bpo_core.register_mode_objective(name)(
        lambda rewards, thinks, g, margin=0.0, scale=1.0: bpo_core.DecisionSignal(1.0 - 2.0 * thinks.float(),
                                                                    torch.ones(len(rewards) // g, dtype=torch.bool)))
    try:
        assert BPOConfig(output_dir=str(tmp_path), mode_objective=name).mode_objective == name
    finally:
        del bpo_core.MODE_OBJECTIVES[name]


@pytest.mark.parametrize("settings, message", [
    (dict(mode_objective="router"), "mode_objective must be one of"),
    (dict(mode_objective="decision", mode_token_loss="off"), "mode_token_loss above 0"),
    (dict(mode_objective="decision", rollout="auto"), "rollout bimode"),
    (dict(thinking_cost_per_token=-0.1), "thinking_cost_per_token must be a finite number >= 0"),
    (dict(direct_margin=float("nan")), "direct_margin must be a finite number"),
    (dict(decision_scale=-1.0), "decision_scale must be a finite number >= 0"),
])
def test_bad_cost_settings_fail_naming_the_field(tmp_path, settings, message):
    from bimode.train.bpo.trainer import BPOConfig

    with pytest.raises(ValueError, match=message):
        BPOConfig(output_dir=str(tmp_path), **settings)


# ---- the trainer ------------------------------------------------------------------------------------
def scored_batch(trainer):
    trainer.model.train()
    output, _ = trainer.generate_and_score(ROWS)
    logged = LastLogged(trainer)
    return output, logged


def test_decision_objective_puts_the_decision_advantage_on_the_forced_tokens_only(tmp_path, trained_tiny,
                                                                                  trained_families_file):
    trainer = make_trainer(trained_tiny, trained_families_file, tmp_path, mode_objective="decision",
                           direct_margin=0.1, rewards=["tests.helpers.bpo_helpers:no_think_wins"])
    output, logged = scored_batch(trainer)
    a = 0.5 / (3 ** -0.5 + 1e-4)  # BPO's own advantage, group rewards [0, 0, 1, 1]
    d = 1.0 + 0.1 - 0.0  # direct accuracy + margin - thinking accuracy
    lengths = [1, 1, 3, 3] * 2  # `\n` for thinking, `\n\n</think>\n\n` for direct (the tiny tokenizer)
    for row, (n, think) in enumerate(zip(lengths, THINKS.tolist())):
        sign = -1 if think else 1
        kept = output["completion_mask"][row].bool()
        assert output["advantages"][row, :n].tolist() == pytest.approx([sign * d] * n)
        assert output["advantages"][row, n:][kept[n:]].tolist() == pytest.approx([sign * a] * int(kept[n:].sum()),
                                                                                  rel=1e-5)
    assert logged["bpo/direct_wins"] == 1.0
    assert logged["bpo/direct_decision_advantage"] == pytest.approx(d)


def test_where_both_modes_are_right_only_a_cost_of_thinking_gives_a_signal(tmp_path, trained_tiny,
                                                                           trained_families_file):
    right = ["tests.helpers.bpo_helpers:always_right"]
    plain, logged = scored_batch(make_trainer(trained_tiny, trained_families_file, tmp_path / "bpo", rewards=right))
    assert plain["advantages"].abs().max().item() == 0.0  # R-4B's BPO: nothing to learn here
    assert logged["bpo/direct_wins"] == 1.0 and logged["bpo/direct_decision_advantage"] == 0.0

    decision, _ = scored_batch(make_trainer(trained_tiny, trained_families_file, tmp_path / "decision",
                                            rewards=right, mode_objective="decision", direct_margin=0.25))
    first = decision["advantages"][:, 0]
    assert first.tolist() == pytest.approx([-0.25, -0.25, 0.25, 0.25] * 2)
    assert decision["advantages"][:, 3:].abs().max().item() == 0.0  # responses: still no signal

    costed, logged = scored_batch(make_trainer(trained_tiny, trained_families_file, tmp_path / "cost",
                                               rewards=right, thinking_cost_per_think=0.5))
    advantages = costed["advantages"]
    assert torch.all(advantages[THINKS] < 0) and torch.all(advantages[~THINKS] > 0)
    assert logged["rewards/thinking_cost/mean"] == pytest.approx(-0.25)  # half the rollouts think
    assert logged["bpo/direct_wins"] == 1.0  # the decision is judged on the task reward, without the cost


@pytest.mark.parametrize("settings", [dict(mode_objective="decision", direct_margin=0.25),
                                      dict(thinking_cost_per_token=0.05), dict()],
                         ids=["decision", "token_cost", "paper_bpo"])
def test_a_cost_of_thinking_trains_the_decision_toward_answering_directly(tmp_path, trained_tiny,
                                                                          trained_families_file, settings):
    """Both modes always right: with a cost, six steps move p_think down; the paper's BPO does not move it."""
    trainer = make_trainer(trained_tiny, trained_families_file, tmp_path, max_steps=6, learning_rate=3e-3,
                           rewards=["tests.helpers.bpo_helpers:always_right"], probe_size=48, **settings)
    drop, before, after = trained_p_think_drop(trainer)
    if settings:
        assert drop > 0.1, (before, after)
    else:
        assert abs(drop) < 0.01, (before, after)


# ---- the cost-of-thinking ranges table (docs/thinking_cost_frontier.md), written from a results file (scripts/thinking_cost_frontier.py) ------
def frontier_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "thinking_cost_frontier.py"
    spec = importlib.util.spec_from_file_location("thinking_cost_frontier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def frontier_run(seed, auto, think, share, fresh_auto, fresh_share, calibrated):
    return {"setting": "BPO (paper)", "seed": seed,
            "eval": {"auto_accuracy": auto, "think_accuracy": think, "token_share": share, "level1_thinking": 0.17,
                     "oracle_accuracy": 1.0, "oracle_share": 0.351 + seed / 1000},
            "fresh": {"auto_accuracy": fresh_auto, "think_accuracy": 0.97, "token_share": fresh_share},
            "calibrated": [calibrated]}


def test_the_ranges_table_gives_each_setting_its_range_over_seeds_as_the_readme_prints_it():
    results = {
        "BPO (paper) | seed 0": frontier_run(0, 0.99, 0.98, 0.672, 0.9696, 0.68, {
            "confidence": 0.95, "met_on_fresh": True, "fresh_token_share": 0.45,
            "fresh_difference": {"difference": 1.0}}),
        "BPO (paper) | seed 1": frontier_run(1, 0.98, 0.98, 0.684, 0.99, 0.68, {
            "confidence": 0.95, "met_on_fresh": False, "fresh_token_share": 0.5,
            "fresh_difference": {"difference": -2.0}}),
    }
    lines = frontier_script().ranges_table(results).splitlines()
    assert lines[0].startswith("| setting (2 seeds) | auto - think, points |")
    # 0 points is "0.0" (never "+0.0", nor "-0.0" for -0.04); one share where the seeds agree once rounded; runs
    # measured before decision agreement and the family's share were leave those cells blank
    assert lines[2] == "| BPO (paper) | 0.0 to +1.0 | 67-68% | 17% |  |  | 0.0 to +2.0, 68% | -; - |"
    assert lines[3] == "| oracle router (same models) | +2.0 | 35% | | | | | |"
    assert "| BPO (paper) | 0.95 | 1 of 2 | -2.0 to +1.0 | 45-50% | 45% |" in lines
    assert "| all settings | 0.95 | 1 of 2 | -2.0 to +1.0 | 45-50% | 45% |" in lines


def test_the_ranges_table_shows_decision_agreement_the_familys_share_and_thinking_per_level():
    module = frontier_script()
    runs = {}
    for seed, (agreement, family) in enumerate([(0.81, 0.9), (0.85, None)]):
        run = frontier_run(seed, 0.98, 0.98, 0.5, 0.97, 0.5, {"confidence": 0.95, "met_on_fresh": True,
                                                              "fresh_token_share": 0.45,
                                                              "fresh_difference": {"difference": 0.0}})
        run["setting"] = "target hard m=0.1"
        run["eval"].update(decision_agreement=agreement, family_routing=family, oracle_family_routing=0.2,
                           thinking_by_level={"1": 0.0, "2": 0.25 + seed / 10, "6": 1.0})
        runs[f"target hard m=0.1 | seed {seed}"] = run
    lines = module.ranges_table(runs).splitlines()
    # a model whose decision is the same on every question has no family share (None): left out of the range
    assert lines[2] == "| decision target, hard, margin 0.1 | 0.0 | 50% | 17% | 81-85% | 90% / 20% | 0.0, 50% | -; - |"
    assert "| setting | L1 | L2 | L6 |" in lines
    assert "| decision target, hard, margin 0.1 | 0% | 25-35% | 100% |" in lines


def test_each_run_records_its_decision_agreement_and_how_much_the_family_explains():
    from tests.unit.test_metrics import row

    # q1, q3 family a (easy: the direct answer is right), q2, q4 family b (hard: only thinking is right); auto
    # thinks on q2 and q4: it agrees with the oracle on all four, and its decision is the family's
    family = {"q1": "a", "q2": "b", "q3": "a", "q4": "b"}
    rows = []
    for qid in family:
        hard = family[qid] == "b"
        level = 6 if hard else 1
        rows += [row(qid, "no_think", 0 if hard else 1, 2, level=level, family=family[qid]),
                 row(qid, "think", 1, 10, level=level, family=family[qid]),
                 row(qid, "auto", 1, 10 if hard else 2, thought=hard, level=level, family=family[qid])]
    summary = frontier_script().summarize(rows, {"think": 1, "no_think": 3})
    assert summary["decision_agreement"] == 1.0
    # the oracle as auto mode pays: (2 + 3) on q1, q3 and (10 + 1) on q2, q4, against think's 10 a question
    assert summary["oracle_share_as_auto"] == 0.8 and summary["all_direct_share_as_auto"] == 0.5
    assert summary["oracle_thinking_by_level"] == {"1": 0.0, "6": 1.0}
    assert "served_share" not in summary  # no run at think_threshold 0.5 among the rows
    # auto mode at think_threshold 0.5: thinks on q4 only, wrong on q2 (answered directly)
    half = [{**r, "mode": "auto"} for r in rows if r["mode"] == ("think" if r["id"] == "q4" else "no_think")]
    summary = frontier_script().summarize(rows, {"think": 1, "no_think": 3}, half)
    assert summary["served_accuracy"] == 0.75 and summary["served_share"] == (2 + 2 + 2 + 10) / 4 / 10
    assert summary["served_thinking"] == 0.25 and summary["decision_agreement"] == 1.0  # auto's own, unchanged
    assert summary["family_routing"] == 1.0 and summary["oracle_family_routing"] == 1.0
    assert summary["thinking_by_level"] == {"1": 0.0, "6": 1.0} and summary["token_share"] == 0.6
    assert summary["goal_met"] is False  # 60% of think's tokens, over the 40% goal


def test_the_readme_table_is_written_between_its_markers_from_the_results():
    module = frontier_script()
    results = {"BPO (paper) | seed 0": frontier_run(0, 0.99, 0.98, 0.672, 0.9696, 0.68, {
        "confidence": 0.95, "met_on_fresh": True, "fresh_token_share": 0.45, "fresh_difference": {"difference": 1.0}})}
    readme = f"# x\n\nbefore\n{module.README_START}\nold table\n{module.README_END}\nafter\n"
    written = module.readme_with_table(readme, results, "r.json")
    assert written.startswith("# x\n\nbefore\n") and written.endswith(f"{module.README_END}\nafter\n")
    assert "old table" not in written and "--table-only r.json --readme README.md" in written
    assert module.ranges_table(results, thresholds=False) in written and "Calibrated thresholds" not in written
    assert module.readme_with_table(written, results, "r.json") == written  # a second run changes nothing
    with pytest.raises(SystemExit, match="needs one"):
        module.readme_with_table("# no markers\n", results, "r.json")


def test_the_readmes_frontier_table_is_the_scripts_output_from_the_published_results():
    """The README's table is not edited by hand: it is what --readme writes from the committed results."""
    from pathlib import Path

    module = frontier_script()
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    source = "docs/thinking_cost_frontier_issue37_results.json"
    results = json.loads((root / source).read_text())
    assert module.readme_with_table(readme, results, source) == readme


def test_a_relabelling_round_curates_with_the_given_model_anneals_it_and_runs_bpo_from_there(tmp_path, trained_tiny):
    """The frontier's `relabel round` (docs/bpo.md): the model annotates the demo's train split, is annealed on its
    own labels, and BPO runs from the annealed model (sizes cut to a few steps here)."""
    from safetensors.torch import load_file

    from bimode.data import synthetic
    from bimode.data.records import read_records, write_records
    from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL

    demo = tmp_path / "demo"
    for split, n in (("train", 24), ("eval", 8)):
        write_records([s.to_record() for s in synthetic.generate(n, seed=9, split=split, families=TRAINED_FAMILIES,
                                                                  max_level=TRAINED_MAX_LEVEL)],
                      demo / "data" / f"{split}.jsonl")
    out = tmp_path / "round"
    final = frontier_script().relabel_round(trained_tiny, demo, out, 0, {
        "relabel_from": "BPO (paper)", "relabel_anneal_steps": 2, "max_steps": 1, "warmup_steps": 0,
        "per_device_train_batch_size": 32})
    summary = json.loads((out / "relabelled" / "summary.json").read_text())
    assert summary["total"]["curated"] == len(read_records(out / "relabelled" / "curated.jsonl")) > 0
    weights = [load_file(folder / "model.safetensors") for folder in (trained_tiny, out / "reannealed" / "final", final)]

    def changed(before, after):
        return any(not torch.equal(before[name], after[name]) for name in before)

    assert final == out / "bpo" / "final"
    assert changed(weights[0], weights[1]) and changed(weights[1], weights[2])  # annealed, then BPO moved it
