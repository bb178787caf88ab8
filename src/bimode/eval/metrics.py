"""Evaluation metrics as pure functions over per-sample rows.

A row is one (query, mode) outcome: {"bench", "id", "mode", "score", "tokens", "thinking_tokens",
"answer_tokens", "thought", "p_think", "family", "level"}. Modes: "think", "no_think", "auto".
Token fields are the Completion's, one definition for every mode and backend (generation.types.token_counts,
docs/tokens.md): "tokens" are the generated tokens (the forced mode suffix excluded), "thinking_tokens" the
model's reasoning tokens inside the think block (0 for a direct answer, auto mode's included), and
"answer_tokens" the rest, so thinking_tokens + answer_tokens = tokens.

The oracle router picks, per query, the cheapest forced mode that is correct (no_think if both are right or
both wrong); its accuracy and tokens are the limit any auto mode can reach with the same model.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from statistics import mean

MODES = ("no_think", "auto", "think")


def bootstrap_ci(values: list[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; the values' order does not matter (a Ray or merged sharded run
    lists its samples in another order than one process does)."""
    if not values:
        return (math.nan, math.nan)
    if len(values) == 1:
        return (values[0], values[0])
    values = sorted(values)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_boot))
    return (means[int(alpha / 2 * n_boot)], means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))])


def mode_summary(rows: list[dict]) -> dict:
    """Accuracy (with a 95% interval), mean tokens split into thinking and the rest (answer_tokens), and
    thinking rate."""
    if not rows:
        return {"n": 0}
    scores = [float(r["score"]) for r in rows]
    lo, hi = bootstrap_ci(scores)
    return {
        "n": len(rows),
        "accuracy": mean(scores),
        "ci95": [lo, hi],
        "tokens": mean(r["tokens"] for r in rows),
        "thinking_tokens": mean(r["thinking_tokens"] for r in rows),
        "answer_tokens": mean(r["answer_tokens"] for r in rows),
        "thinking_rate": mean(1.0 if r["thought"] else 0.0 for r in rows),
    }


def by_query(rows: list[dict]) -> dict:
    queries: dict = defaultdict(dict)
    for r in rows:
        queries[(r["bench"], r["id"])][r["mode"]] = r
    return queries


def oracle_choice(think: dict, no_think: dict) -> str:
    """The cheapest correct forced mode; no_think when neither or both are right."""
    if no_think["score"] >= 1 or think["score"] < 1:
        return "no_think"
    return "think"


def oracle_summary(rows: list[dict], decision_tokens: dict[str, int] | None = None) -> dict:
    """Oracle accuracy and tokens over queries that have both forced modes. With `decision_tokens`
    (modes.decision_tokens: per mode, what auto mode generates that the forced mode is given), also
    `tokens_as_auto`: the oracle's choices charged as auto mode pays for them."""
    chosen = []
    for modes in by_query(rows).values():
        if "think" in modes and "no_think" in modes:
            chosen.append(modes[oracle_choice(modes["think"], modes["no_think"])])
    if not chosen:
        return {"n": 0}
    out = {"n": len(chosen), "accuracy": mean(float(r["score"]) for r in chosen),
           "tokens": mean(r["tokens"] for r in chosen),
           "thinking_rate": mean(1.0 if r["mode"] == "think" else 0.0 for r in chosen)}
    if decision_tokens is not None:
        out["tokens_as_auto"] = mean(r["tokens"] + decision_tokens[r["mode"]] for r in chosen)
    return out


def matthews(predicted: list[bool], actual: list[bool]) -> float:
    """Matthews correlation; 0.0 where it is undefined (a constant predictor or label)."""
    tp = sum(p and a for p, a in zip(predicted, actual))
    tn = sum(not p and not a for p, a in zip(predicted, actual))
    fp = sum(p and not a for p, a in zip(predicted, actual))
    fn = sum(not p and a for p, a in zip(predicted, actual))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def mode_selection(rows: list[dict]) -> dict:
    """How well auto mode picks: Hybrid Accuracy (share choosing the oracle's mode) and MCC of thinking
    against the oracle's need to think (think right and no_think wrong)."""
    picked, needed, agree = [], [], []
    for modes in by_query(rows).values():
        if not {"think", "no_think", "auto"} <= set(modes):
            continue
        oracle = oracle_choice(modes["think"], modes["no_think"])
        thought = bool(modes["auto"]["thought"])
        picked.append(thought)
        needed.append(oracle == "think")
        agree.append((oracle == "think") == thought)
    if not picked:
        return {"n": 0}
    return {"n": len(picked), "hybrid_accuracy": mean(1.0 if a else 0.0 for a in agree),
            "mcc": matthews(picked, needed), "need_think_rate": mean(1.0 if n else 0.0 for n in needed)}


def _entropy(labels: list) -> float:
    """Shannon entropy (bits) of the labels' empirical distribution."""
    n = len(labels)
    return -sum(c / n * math.log2(c / n) for c in (labels.count(v) for v in set(labels)))


def uncertainty_coefficient(decisions: list[bool], groups: list) -> float | None:
    """How much of the decisions the group label explains: U = 1 - H(decision | group) / H(decision) (Theil's U,
    the share of the decision's entropy the label removes). 1: within each group every decision is the same (the
    label fixes it); 0: the decision is spread alike in every group. None where every decision is the same (nothing
    to explain)."""
    total = _entropy(decisions)
    if total == 0:
        return None
    by_group: dict = defaultdict(list)
    for decision, group in zip(decisions, groups):
        by_group[group].append(decision)
    conditional = sum(len(d) / len(decisions) * _entropy(d) for d in by_group.values())
    return 1.0 - conditional / total


def routing_explained_by(rows: list[dict], key: str = "family") -> dict:
    """How much of the routing one label (`key`: family, level) explains, as `uncertainty_coefficient`, for auto
    mode's decision (thought or not) and for the oracle router's (think iff the thinking answer is right and the
    direct one wrong, `oracle_choice`), over the queries that have all three modes. A router that routes by family
    alone scores 1; the oracle's own figure says how much of the ideal decision the label could carry."""
    auto, oracle, labels = [], [], []
    for modes in by_query(rows).values():
        if not {"think", "no_think", "auto"} <= set(modes):
            continue
        auto.append(bool(modes["auto"]["thought"]))
        oracle.append(oracle_choice(modes["think"], modes["no_think"]) == "think")
        labels.append(modes["auto"].get(key))
    if not auto:
        return {"n": 0}
    return {"n": len(auto), "auto": uncertainty_coefficient(auto, labels),
            "oracle": uncertainty_coefficient(oracle, labels)}


def threshold_curve(rows: list[dict], thresholds: list[float] | None = None) -> list[dict]:
    """Accuracy and tokens if auto thought exactly when p_think >= t, from the forced-mode outcomes.

    With greedy decoding a thresholded auto sample is the forced sample of the chosen mode, so the curve
    needs no new generation. Thresholds default to every distinct p_think plus 0 and just above 1.
    """
    queries = [m for m in by_query(rows).values()
               if "think" in m and "no_think" in m and m["think"].get("p_think") is not None]
    if not queries:
        return []
    if thresholds is None:
        thresholds = sorted({0.0, 1.0 + 1e-9} | {q["think"]["p_think"] for q in queries})
    curve = []
    for t in thresholds:
        chosen = [q["think"] if q["think"]["p_think"] >= t else q["no_think"] for q in queries]
        curve.append({"threshold": t, "accuracy": mean(float(r["score"]) for r in chosen),
                      "tokens": mean(r["tokens"] for r in chosen),
                      "thinking_rate": mean(1.0 if r["mode"] == "think" else 0.0 for r in chosen)})
    return curve


def relative_efficiency(summary: dict) -> dict:
    """Auto against think: accuracy difference and token ratio."""
    auto, think = summary.get("auto"), summary.get("think")
    if not auto or not think or not auto.get("n") or not think.get("n"):
        return {}
    ratio = auto["tokens"] / think["tokens"] if think["tokens"] else math.nan
    return {"accuracy_delta": auto["accuracy"] - think["accuracy"], "token_ratio": ratio}


def summarize(rows: list[dict]) -> dict:
    """Every metric for one group of rows."""
    modes = {m: mode_summary([r for r in rows if r["mode"] == m]) for m in MODES}
    modes = {m: s for m, s in modes.items() if s["n"]}
    return {"modes": modes, "oracle": oracle_summary(rows), "selection": mode_selection(rows),
            "auto_vs_think": relative_efficiency(modes), "threshold_curve": threshold_curve(rows)}


def group_metrics(rows: list[dict]) -> dict:
    """summarize() overall, per benchmark, and per benchmark x family and benchmark x level."""
    out = {"overall": summarize(rows), "benchmarks": {}}
    for bench in sorted({r["bench"] for r in rows}):
        bench_rows = [r for r in rows if r["bench"] == bench]
        entry = summarize(bench_rows)
        for key in ("family", "level"):
            values = sorted({r.get(key) for r in bench_rows if r.get(key) is not None}, key=str)
            entry[f"by_{key}"] = {str(v): summarize([r for r in bench_rows if r.get(key) == v]) for v in values}
        out["benchmarks"][bench] = entry
    return out
