"""Eval metrics on hand-worked examples."""

import math

import pytest

from bimode.eval.metrics import (
    bootstrap_ci, group_metrics, matthews, mode_selection, mode_summary, oracle_summary, relative_efficiency,
    summarize, threshold_curve,
)
from bimode.modes import decision_tokens


def row(qid, mode, score, tokens, thought=None, p=None, level=1, bench="b", family="f"):
    return {"bench": bench, "id": qid, "mode": mode, "score": score, "tokens": tokens,
            "thinking_tokens": tokens - 1 if (thought if thought is not None else mode == "think") else 0,
            "answer_tokens": 1, "thought": thought if thought is not None else mode == "think",
            "p_think": p, "level": level, "family": family}


# Four queries, hand-worked:
#   q1 easy: no_think right (2 tok), think right (10), auto no-think right (3)      -> oracle no_think, auto agrees
#   q2 hard: no_think wrong (2),     think right (12), auto thinks, right (12)      -> oracle think, auto agrees
#   q3 hard: no_think wrong (2),     think right (14), auto no-think, wrong (3)     -> oracle think, auto disagrees
#   q4 impossible: both wrong (2 / 20), auto thinks, wrong (20)                     -> oracle no_think, auto disagrees
ROWS = [
    row("q1", "no_think", 1, 2), row("q1", "think", 1, 10, p=0.2), row("q1", "auto", 1, 3, thought=False),
    row("q2", "no_think", 0, 2), row("q2", "think", 1, 12, p=0.9), row("q2", "auto", 1, 12, thought=True),
    row("q3", "no_think", 0, 2), row("q3", "think", 1, 14, p=0.4), row("q3", "auto", 0, 3, thought=False),
    row("q4", "no_think", 0, 2), row("q4", "think", 0, 20, p=0.7), row("q4", "auto", 0, 20, thought=True),
]


def test_mode_summary():
    s = mode_summary([r for r in ROWS if r["mode"] == "think"])
    assert s["n"] == 4 and s["accuracy"] == 0.75 and s["tokens"] == 14.0 and s["thinking_rate"] == 1.0
    assert s["thinking_tokens"] == 13.0 and s["answer_tokens"] == 1.0
    lo, hi = s["ci95"]
    assert 0.0 <= lo <= 0.75 <= hi <= 1.0


def test_oracle_router():
    o = oracle_summary(ROWS)
    # picks no_think (q1, right, 2), think (q2, right, 12), think (q3, right, 14), no_think (q4, wrong, 2)
    assert o == {"n": 4, "accuracy": 0.75, "tokens": 7.5, "thinking_rate": 0.5}
    # charged as auto mode pays: 1 decision token on each think, 3 (decision and closing tags) on each direct
    assert oracle_summary(ROWS, {"think": 1, "no_think": 3})["tokens_as_auto"] == 7.5 + (1 + 1 + 3 + 3) / 4


def test_decision_tokens_are_what_auto_mode_generates_beyond_each_forced_modes_prompt(tiny_processor):
    # Qwen3's tokenizer: `\n` after <think> on a thinking answer; `\n\n`, `</think>`, `\n\n` on a direct one
    # (in the trained tiny model's eval samples an auto-mode direct answer counts 4 tokens, the forced one 1)
    assert decision_tokens(tiny_processor.tokenizer) == {"think": 1, "no_think": 3}


def test_hybrid_accuracy_and_mcc():
    sel = mode_selection(ROWS)
    # auto thinks on q2, q4; oracle needs thinking on q2, q3: agreement on q1, q2 -> 0.5
    assert sel["n"] == 4 and sel["hybrid_accuracy"] == 0.5 and sel["need_think_rate"] == 0.5
    # tp=1 (q2) tn=1 (q1) fp=1 (q4) fn=1 (q3): (1-1)/sqrt(2*2*2*2) = 0
    assert sel["mcc"] == 0.0


def test_matthews_by_hand_and_undefined_cases():
    assert matthews([True, False, True, False], [True, False, True, False]) == 1.0
    assert matthews([True, False], [False, True]) == -1.0
    # tp=2 tn=1 fp=1 fn=0: (2*1-1*0)/sqrt(3*2*2*1) = 2/sqrt(12)
    assert matthews([True, True, True, False], [True, True, False, False]) == pytest.approx(2 / math.sqrt(12))
    assert matthews([False, False], [True, False]) == 0.0  # never thinks: undefined -> 0
    assert matthews([True, True], [True, True]) == 0.0


def test_threshold_curve_by_hand():
    curve = {round(c["threshold"], 6): c for c in threshold_curve(ROWS)}
    # t=0: all think -> acc 3/4, tokens 14; t above 1: none think -> acc 1/4, tokens 2
    assert curve[0.0]["accuracy"] == 0.75 and curve[0.0]["tokens"] == 14.0 and curve[0.0]["thinking_rate"] == 1.0
    assert curve[1.0]["accuracy"] == 0.25 and curve[1.0]["tokens"] == 2.0 and curve[1.0]["thinking_rate"] == 0.0
    # t=0.7: think on q2 (0.9), q4 (0.7): right q1? no_think right; q2 think right; q3 no_think wrong; q4 think wrong
    assert curve[0.7]["accuracy"] == 0.5 and curve[0.7]["tokens"] == (2 + 12 + 2 + 20) / 4


def test_relative_efficiency():
    eff = relative_efficiency(summarize(ROWS)["modes"])
    # auto acc 0.5, tokens 9.5; think acc 0.75, tokens 14
    assert eff["accuracy_delta"] == pytest.approx(-0.25) and eff["token_ratio"] == pytest.approx(9.5 / 14)


def test_edge_cases_no_thinking_all_wrong_one_sample():
    never = [row("a", "no_think", 0, 2), row("a", "think", 0, 9, p=0.1), row("a", "auto", 0, 2, thought=False)]
    m = summarize(never)
    assert m["modes"]["auto"]["thinking_rate"] == 0.0 and m["modes"]["think"]["accuracy"] == 0.0
    assert m["oracle"]["accuracy"] == 0.0 and m["oracle"]["tokens"] == 2.0  # both wrong: the cheap mode
    assert m["selection"]["mcc"] == 0.0 and m["selection"]["hybrid_accuracy"] == 1.0
    assert bootstrap_ci([1.0]) == (1.0, 1.0)
    assert summarize([row("x", "think", 1, 5)])["oracle"] == {"n": 0}  # no forced pair: no oracle
    assert mode_selection([row("x", "think", 1, 5)]) == {"n": 0}


def test_grouping_by_bench_level_family():
    rows = ROWS + [dict(r, bench="c", level=2, family="g") for r in ROWS[:3]]
    g = group_metrics(rows)
    assert set(g["benchmarks"]) == {"b", "c"}
    assert g["benchmarks"]["b"]["by_level"]["1"]["modes"]["think"]["n"] == 4
    assert g["benchmarks"]["c"]["by_family"]["g"]["modes"]["auto"]["n"] == 1
    assert g["overall"]["modes"]["think"]["n"] == 5


def test_the_uncertainty_coefficient_is_the_share_of_the_decisions_entropy_a_label_removes():
    from bimode.eval.metrics import uncertainty_coefficient

    assert uncertainty_coefficient([True, True, False, False], ["a", "a", "b", "b"]) == 1.0  # the label fixes it
    assert uncertainty_coefficient([True, False, True, False], ["a", "a", "b", "b"]) == 0.0  # it tells nothing
    # by hand: H(decision) = H(3/4) = 0.8113 bits; H(decision | label) = 1/2 x 0 + 1/2 x 1 = 0.5 bits
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert uncertainty_coefficient([True, True, True, False], ["a", "a", "b", "b"]) == pytest.approx(1 - 0.5 / h)
    assert uncertainty_coefficient([True, True], ["a", "b"]) is None  # one decision everywhere: nothing to explain


def test_routing_explained_by_a_family_for_auto_and_for_the_oracle():
    from bimode.eval.metrics import routing_explained_by

    # ROWS' auto thinks on q2 and q4, the oracle on q2 and q3: families {q1, q3} and {q2, q4} fix auto's decision
    # and tell nothing of the oracle's
    family = {"q1": "a", "q2": "b", "q3": "a", "q4": "b"}
    rows = [{**r, "family": family[r["id"]]} for r in ROWS]
    assert routing_explained_by(rows, "family") == {"n": 4, "auto": 1.0, "oracle": 0.0}
    # a query without its auto row is left out; no query with all three modes: nothing measured
    assert routing_explained_by([r for r in rows if not (r["id"] == "q4" and r["mode"] == "auto")])["n"] == 3
    assert routing_explained_by([r for r in rows if r["mode"] != "auto"]) == {"n": 0}
