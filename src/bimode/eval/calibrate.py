"""`bimode eval calibrate`: pick auto mode's `think_threshold` from an eval run, and check it on held-out questions.

With a threshold t, auto mode thinks on a question iff its p_think >= t, and (greedy) that sample is the forced
sample of the chosen mode, so an eval run's think and no_think rows give every threshold's accuracy and tokens
without generating anything (`metrics.threshold_curve`). Two goals, against forced thinking on the same
questions:

- `max_drop` (accuracy points): the fewest mean tokens whose accuracy is at most that far below think mode's;
  ties go to the higher accuracy, then the higher threshold (less thinking).
- `token_share` (a fraction of think mode's mean tokens): the best accuracy within that many tokens; ties go
  to the fewer tokens, then the higher threshold.

A threshold picked and scored on the same questions flatters itself, so the questions are split: the choice is
made on one part and reported on the other (`holdout_fraction` of the run's questions, drawn by a hash of
benchmark, id and seed, so the same run and seed always split the same way), or on a second run of other
questions (`holdout_rows`, all of the first run then picks).

Even so, a threshold whose measured accuracy sits exactly on the goal's edge misses it on new questions about
half the time: the picking questions are a sample. With `confidence` (0.95 by default) a threshold counts as
meeting the goal only if it does so at that one-sided confidence, by a paired bootstrap over the picking
questions: the lower bound on (auto's accuracy - think's) for `max_drop`, the upper bound on (auto's tokens -
token_share x think's) for `token_share`. The bounds hold for all thresholds at once (a studentized band),
since the pick is the cheapest threshold that passes. `confidence 0` is the plain pick. Tested in
tests/unit/test_calibrate.py: picks on 400 questions checked on 200,000 new ones, 40 times.
"""

from __future__ import annotations

import hashlib
from itertools import pairwise
from statistics import mean

import numpy as np

from bimode.errors import UsageError
from bimode.eval.metrics import by_query, oracle_summary, threshold_curve

BOOTSTRAP_RESAMPLES = 2000


class CalibrationError(UsageError):
    """The run cannot be calibrated as asked (no auto rows, a goal no threshold meets, ...)."""


def usable_queries(rows: list[dict], source: str = "the run") -> dict:
    """{(bench, id): {mode: row}} of the questions with think and no_think rows and a p_think; a clear error
    when there are none."""
    queries = {k: m for k, m in by_query(rows).items() if "think" in m and "no_think" in m}
    if not queries:
        raise CalibrationError(f"{source} has no question with both think and no_think rows: calibration needs "
                               "an eval run with --modes think,no_think (auto may be added)")
    if any(m["think"].get("p_think") is None for m in queries.values()):
        raise CalibrationError(f"{source} has rows without p_think (a server that does not report it, e.g. vLLM): "
                               "calibrate a `bimode eval` run on the checkpoint or against `bimode serve`")
    return queries


def between(lo: float, hi: float) -> float:
    """The number with the fewest decimals strictly between lo and hi, near their midpoint (hi itself where
    floats hold none): a threshold that separates lo (not thinking) from hi (thinking, p_think >= it) and
    reads well on a command line."""
    mid = (lo + hi) / 2
    for digits in range(1, 18):
        value = round(mid, digits)
        if lo < value < hi:
            return value
    return hi


def candidate_thresholds(p_thinks: list[float]) -> list[float]:
    """0 (always think), 1 (think only where p_think is 1), and one threshold between each pair of neighbouring
    p_think values: every way a threshold can split these questions, each as far as possible from the values
    it separates, so that new questions near them fall the same way as often as not."""
    values = sorted(set(p_thinks))
    inner = [between(lo, hi) for lo, hi in pairwise(values)]
    return sorted({0.0, 1.0, *inner})


def _point(rows: list[dict], threshold: float) -> dict:
    return threshold_curve(rows, [threshold])[0]


def paired_differences(queries: dict, thresholds: list[float], token_share: float | None = None) -> np.ndarray:
    """(thresholds x questions): per question, auto-at-threshold's score minus think's, or with `token_share`
    auto's tokens minus token_share x think's: the paired differences whose mean the goal bounds."""
    ordered = [queries[key] for key in sorted(queries, key=str)]  # the bootstrap's columns: not the file's order
    think = [m["think"] for m in ordered]
    direct = [m["no_think"] for m in ordered]
    p_think = np.array([r["p_think"] for r in think], dtype=float)[None, :]
    chooses_think = p_think >= np.asarray(thresholds, dtype=float)[:, None]
    field = "score" if token_share is None else "tokens"
    on_think = np.array([float(r[field]) for r in think])[None, :]
    on_direct = np.array([float(r[field]) for r in direct])[None, :]
    chosen = np.where(chooses_think, on_think, on_direct)
    return chosen - (on_think if token_share is None else token_share * on_think)


def bootstrap_means(differences: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """(rows x resamples): the mean of each row of `differences` over the same bootstrap resamples of its
    columns (questions), as one matrix product: every threshold sees the same resamples."""
    n = differences.shape[1]
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    return differences @ counts.T / n


def confidence_bound(differences: np.ndarray, confidence: float, upper: bool = False, seed: int = 0) -> np.ndarray:
    """One-sided bounds on the mean of each row (lower unless `upper`) that hold for all rows at once at
    `confidence`: a studentized bootstrap band (sup-t). Bounds that hold one row at a time are not enough here:
    the pick is the cheapest row whose bound passes, so it favours rows whose sample happened to flatter them
    (measured on the world of tests/unit/test_calibrate.py: bounds one row at a time missed the goal in 6 of 40
    picks, the band in none)."""
    observed = differences.mean(axis=1)
    deviation = bootstrap_means(differences, seed) - observed[:, None]  # sample mean - truth, as resampled
    spread = deviation.std(axis=1)
    scaled = np.divide(deviation, spread[:, None], out=np.zeros_like(deviation), where=spread[:, None] > 0)
    worst = (scaled.min(axis=0) if upper else scaled.max(axis=0))  # per resample, the most flattered row
    quantile = np.quantile(worst, 1 - confidence if upper else confidence)
    return observed - quantile * spread


def difference_interval(queries: dict, threshold: float, confidence: float, seed: int = 0) -> dict:
    """Auto-at-threshold minus think accuracy, in points, with its two-sided bootstrap interval."""
    d = paired_differences(queries, [threshold])
    low, high = np.quantile(bootstrap_means(d, seed)[0], [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"difference": 100 * float(d.mean()), "low": 100 * float(low), "high": 100 * float(high),
            "confidence": confidence}


def pick_threshold(rows: list[dict], max_drop: float | None = None, token_share: float | None = None,
                   confidence: float = 0.0, seed: int = 0) -> dict:
    """The threshold that meets the goal on `rows` (see the module docstring): {"threshold", "accuracy",
    "tokens", "thinking_rate", "think": think mode's {"accuracy", "tokens"}, "bound": the goal's confidence
    bound (points below think's accuracy, or tokens over the share) when `confidence` > 0}. Raises
    CalibrationError when no threshold meets it."""
    if not 0 <= confidence < 1:
        raise CalibrationError(f"confidence must be in [0, 1), got {confidence}")
    if (max_drop is None) == (token_share is None):
        raise CalibrationError("give one goal: max_drop (accuracy points) or token_share (of think mode's tokens)")
    if max_drop is not None and max_drop < 0:
        raise CalibrationError(f"max_drop must be >= 0 accuracy points, got {max_drop}")
    if token_share is not None and not token_share > 0:
        raise CalibrationError(f"token_share must be > 0, got {token_share}")
    queries = usable_queries(rows)
    think = {"accuracy": mean(float(m["think"]["score"]) for m in queries.values()),
             "tokens": mean(m["think"]["tokens"] for m in queries.values())}
    thresholds = candidate_thresholds([m["think"]["p_think"] for m in queries.values()])
    curve = threshold_curve(rows, thresholds)
    eps = 1e-9  # accuracies and token means are sums of floats: equal goals must compare equal
    if confidence:  # the goal's bound, per threshold, replaces its measured value
        differences = paired_differences(queries, thresholds, token_share)
        bounds = confidence_bound(differences, confidence, upper=token_share is not None, seed=seed)
        for c, bound in zip(curve, bounds):
            c["bound"] = float(bound)
    if max_drop is not None:
        floor = think["accuracy"] - max_drop / 100
        feasible = [c for c in curve if (c["bound"] >= -max_drop / 100 - eps if confidence
                                         else c["accuracy"] >= floor - eps)]
        key = lambda c: (round(c["tokens"], 9), -round(c["accuracy"], 9), -c["threshold"])
    else:
        cap = token_share * think["tokens"]
        feasible = [c for c in curve if (c["bound"] <= eps if confidence else c["tokens"] <= cap + eps)]
        key = lambda c: (-round(c["accuracy"], 9), round(c["tokens"], 9), -c["threshold"])
    if not feasible:  # only a token share can fail: threshold 0 is think mode itself, within any drop
        cheapest = min(curve, key=lambda c: (c["tokens"], -c["threshold"]))
        sure = f" at {100 * confidence:g}% confidence" if confidence else ""
        raise CalibrationError(
            f"no threshold keeps auto mode within {100 * token_share:g}% of think mode's {think['tokens']:.1f} "
            f"mean tokens on {len(queries)} questions{sure}: the cheapest (threshold {cheapest['threshold']:g}) "
            f"uses {cheapest['tokens']:.1f} ({100 * cheapest['tokens'] / think['tokens']:.0f}%)")
    chosen = dict(min(feasible, key=key))
    chosen.pop("bound", None)
    return {**chosen, "think": think}


def _in_holdout(bench: str, id_: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}\0{bench}\0{id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_rows(rows: list[dict], fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(picking rows, held-out rows): each question, all its modes together, goes to the held-out part with
    probability `fraction`, decided by a hash of (seed, bench, id)."""
    if not 0 < fraction < 1:
        raise CalibrationError(f"holdout_fraction must be between 0 and 1, got {fraction}")
    pick, holdout = [], []
    for r in rows:
        (holdout if _in_holdout(r["bench"], r["id"], fraction, seed) else pick).append(r)
    return pick, holdout


def split_summary(rows: list[dict], threshold: float, confidence: float = 0.95, seed: int = 0) -> dict:
    """Think, no_think, the run's own auto rows (if any), auto at `threshold` and the oracle router on the
    questions calibration can use: {name: {"n", "accuracy", "tokens", "thinking_rate"}}, and "difference":
    auto at `threshold` minus think, in accuracy points, with its two-sided bootstrap interval."""
    queries = usable_queries(rows)
    keep = [r for k, m in queries.items() for r in m.values()]
    out = {}
    for mode in ("no_think", "auto", "think"):
        chosen = [m[mode] for m in queries.values() if mode in m]
        if chosen:
            out[mode] = {"n": len(chosen), "accuracy": mean(float(r["score"]) for r in chosen),
                         "tokens": mean(r["tokens"] for r in chosen),
                         "thinking_rate": mean(1.0 if r["thought"] else 0.0 for r in chosen)}
    out["calibrated"] = {"n": len(queries), **{k: v for k, v in _point(keep, threshold).items() if k != "threshold"}}
    oracle = oracle_summary(keep)
    out["oracle"] = {"n": oracle["n"], "accuracy": oracle["accuracy"], "tokens": oracle["tokens"],
                     "thinking_rate": oracle["thinking_rate"]}
    out["difference"] = difference_interval(queries, threshold, confidence or 0.95, seed)
    return out


def calibrate(rows: list[dict], max_drop: float | None = None, token_share: float | None = None,
              holdout_fraction: float = 0.5, seed: int = 0, holdout_rows: list[dict] | None = None,
              confidence: float = 0.95) -> dict:
    """Pick on one part, report on both: {"threshold", "goal", "confidence", "held_out" ("fraction", with
    "holdout_fraction" and "seed", or "run"), "pick": split_summary, "holdout": split_summary,
    "met_on_holdout"}. With `holdout_rows` (a second run), all of `rows` picks and those rows are the holdout;
    the two may not share a question. `seed` also seeds the bootstrap."""
    if holdout_rows is None:
        pick, holdout = split_rows(rows, holdout_fraction, seed)
        how = {"held_out": "fraction", "holdout_fraction": holdout_fraction, "seed": seed}
    else:
        shared = {(r["bench"], r["id"]) for r in rows} & {(r["bench"], r["id"]) for r in holdout_rows}
        if shared:
            raise CalibrationError(f"the held-out run shares {len(shared)} questions with the picking run "
                                   f"(e.g. {min(shared)}): it must hold other questions")
        pick, holdout = rows, holdout_rows
        how = {"held_out": "run"}
    usable_queries(pick, "the picking part")
    usable_queries(holdout, "the held-out part")
    chosen = pick_threshold(pick, max_drop=max_drop, token_share=token_share, confidence=confidence, seed=seed)
    result = {"threshold": chosen["threshold"],
              "goal": {"max_drop": max_drop} if max_drop is not None else {"token_share": token_share},
              "confidence": confidence, **how,
              "pick": split_summary(pick, chosen["threshold"], confidence, seed),
              "holdout": split_summary(holdout, chosen["threshold"], confidence, seed)}
    held, think = result["holdout"]["calibrated"], result["holdout"]["think"]
    if max_drop is not None:
        result["met_on_holdout"] = held["accuracy"] >= think["accuracy"] - max_drop / 100 - 1e-9
    else:
        result["met_on_holdout"] = held["tokens"] <= token_share * think["tokens"] + 1e-9
    return result


def render_calibration(result: dict, run: str) -> str:
    """The result as markdown: the goal, the threshold, and both parts' numbers."""
    goal = result["goal"]
    drop = goal.get("max_drop")
    text = (f"the fewest tokens with accuracy at most {drop:g} point{'' if drop == 1 else 's'} below think mode's"
            if "max_drop" in goal
            else f"the best accuracy within {100 * goal['token_share']:g}% of think mode's mean tokens")
    held_out = (f"{100 * result['holdout_fraction']:g}% of the questions (hash split, seed {result['seed']})"
                if result["held_out"] == "fraction" else "a second run")
    confidence = result.get("confidence", 0.0)
    sure = (f", met at {100 * confidence:g}% one-sided confidence by a paired bootstrap over the picking "
            f"questions" if confidence else " (measured, no margin for sampling noise)")
    lines = [f"# Calibrated think threshold for {run}", "",
             f"Goal: {text}{sure}. Picked on the other questions, reported on {held_out}.", "",
             (f"**think_threshold = {result['threshold']!r}** (auto mode thinks iff p_think >= it); on the "
              f"held-out questions the goal is {'met' if result['met_on_holdout'] else 'NOT met'}."), "",
             "| part | mode | n | accuracy % | mean tokens | thinks % |", "|---|---|---|---|---|---|"]
    names = {"no_think": "no_think", "auto": "auto (as evaluated)", "think": "think",
             "calibrated": f"auto, threshold {result['threshold']!r}", "oracle": "oracle router"}
    for part in ("pick", "holdout"):
        for key, name in names.items():
            s = result[part].get(key)
            if s and s.get("n"):
                lines.append(f"| {'picking' if part == 'pick' else 'held out'} | {name} | {s['n']} | "
                             f"{100 * s['accuracy']:.1f} | {s['tokens']:.1f} | {100 * s['thinking_rate']:.1f} |")
    lines += ["", "Auto at the threshold minus think mode, accuracy points (two-sided bootstrap interval):", ""]
    for part in ("pick", "holdout"):
        d = result[part].get("difference")
        if d:
            lines.append(f"- {'picking' if part == 'pick' else 'held out'}: {d['difference']:+.1f} "
                         f"[{d['low']:+.1f}, {d['high']:+.1f}] at {100 * d['confidence']:g}%")
    lines += ["", (f"Use it: `bimode serve MODEL --think_threshold {result['threshold']!r}` (or a request's "
                   f"`think_threshold`), `bimode chat MODEL --think_threshold {result['threshold']!r}`.")]
    return "\n".join(lines) + "\n"
