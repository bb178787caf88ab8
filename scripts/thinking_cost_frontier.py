"""A cost of thinking in BPO, measured as a frontier on the embedded default (docs/bpo.md, "A cost of thinking").

From the demo's annealed model (run `make demo` first), BPO with the demo's settings (configs/recipes/demo.yaml
over tiny_bpo.yaml) is run once per setting and seed:
  BPO (paper)           accuracy reward only, the forced mode tokens carry the rollout's advantage
  token cost C          thinking_cost_per_token C: reward minus C per thinking token
  think cost C          thinking_cost_per_think C: reward minus C for a rollout that thinks
  decision m [x s]      mode_objective decision, direct_margin m (AdaptThink-style decision advantage on the
                        forced mode tokens, carried at full weight), decision_scale s (default 1)
  ..., 600 steps        the same, three times as long
  decoupled ...         decision_loss decoupled: the decision token's own loss term (Thinkless' DeGRPO), weight 1
  target hard/soft m    decision_target hard or soft with direct_margin m: a cross-entropy on the decision token
                        toward each query's own forced groups' verdict (docs/bpo.md, "Learning the decision per query")
  target majority       decision_target majority: the same toward the oracle's rule on each group's majority verdict
  relabel round         an on-policy relabelling round: the seed's BPO (paper) model curates the train split again
                        as the annotator (tiny_curate), is annealed on its own labels (300 steps), then the
                        round's BPO settings run from there
Each final model is evaluated greedily in auto, think and no_think mode, and in auto mode at think_threshold 0.5
(its own decision read from the prompt's pass and served with the chosen suffix in the prompt, as a threshold is),
on the demo's eval split (400 questions) and on a fresh split of 600 questions drawn with a seed the project uses
nowhere else (from the demo run's own families). Per run:
auto accuracy and tokens against think mode's, the oracle router (per question, the cheaper forced mode that
is right; also charged as auto mode pays, modes.decision_tokens), auto mode's thinking rate per level, its decision agreement with the oracle router (the share of
questions where it thinks exactly where the oracle does) and how much of its decision the family label explains
(eval.metrics.routing_explained_by; the oracle's own figure beside it), whether it met the goal (GOAL: within a
point of think at no more than 40% of its tokens, level 1 thinking at most 10%, the top level's at least 80%), and
each model's threshold calibrated on the eval split (max_drop 1 point, 95% confidence and the plain pick), checked
on the fresh split. Writes results.json, frontier.md and
frontier.png to --out; frontier.md ends with the ranges over seeds per setting (docs/thinking_cost_frontier.md).

    .venv/bin/python scripts/thinking_cost_frontier.py --demo runs/demo --out runs/frontier [--seeds 0 1 2]
                    [--settings NAME ...]   # only these settings (runs already in results.json are kept)
    .venv/bin/python scripts/thinking_cost_frontier.py --table-only --markdown docs/thinking_cost_frontier.md
                    # the ranges from docs/thinking_cost_frontier_results.json (or --table-only FILE), no training
                    [--readme README.md]   # also into the README, between its thinking-cost-frontier markers
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean

import torch
from transformers import AutoTokenizer

from bimode.data import synthetic
from bimode.data.records import read_records, write_records
from bimode.demo import anneal_tiny, tiny_eval_samples, train_to_final
from bimode.eval.calibrate import calibrate
from bimode.eval.metrics import group_metrics, oracle_summary, routing_explained_by
from bimode.eval.runner import read_samples
from bimode.generation.engine import TransformersEngine
from bimode.models import load_model
from bimode.modes import decision_tokens
from bimode.recipes import load_recipe, recipe_values
from bimode.train.bpo.trainer import BPOConfig

SETTINGS = {
    "BPO (paper)": {},
    "token cost 0.01": dict(thinking_cost_per_token=0.01),
    "token cost 0.03": dict(thinking_cost_per_token=0.03),
    "think cost 0.3": dict(thinking_cost_per_think=0.3),
    "decision m=0.1": dict(mode_objective="decision", direct_margin=0.1, mode_token_loss="on"),
    "decision m=0.3": dict(mode_objective="decision", direct_margin=0.3, mode_token_loss="on"),
    "decision m=0.3 x4": dict(mode_objective="decision", direct_margin=0.3, decision_scale=4.0, mode_token_loss="on"),
    "token cost 0.03, 600 steps": dict(thinking_cost_per_token=0.03, max_steps=600),
    "decision m=0.3, 600 steps": dict(mode_objective="decision", direct_margin=0.3, mode_token_loss="on",
                                      max_steps=600),
    # issue 37: the decision learned per query (docs/bpo.md, "Learning the decision per query")
    "decoupled": dict(decision_loss="decoupled"),
    "decoupled, decision m=0.3": dict(decision_loss="decoupled", mode_objective="decision", direct_margin=0.3),
    "target hard m=0.1": dict(decision_target="hard", direct_margin=0.1),
    "target soft m=0.1": dict(decision_target="soft", direct_margin=0.1, decision_target_temperature=0.1),
    "target majority": dict(decision_target="majority"),
    # an on-policy relabelling round: the paper's BPO model of the same seed annotates the train split again
    # (tiny_curate), is annealed on its own labels, then BPO runs again (relabel_round below)
    "relabel round": dict(relabel_from="BPO (paper)", relabel_anneal_steps=300),
}
LABELS = {"think cost 0.3": "think cost 0.3 (per thinking rollout)", "decision m=0.1": "decision, margin 0.1",
          "decision m=0.3": "decision, margin 0.3", "decision m=0.3 x4": "decision, margin 0.3, scale 4",
          "decision m=0.3, 600 steps": "decision, margin 0.3, 600 steps",
          "decoupled": "decoupled decision loss (DeGRPO)",
          "decoupled, decision m=0.3": "decoupled decision loss, decision margin 0.3",
          "target hard m=0.1": "decision target, hard, margin 0.1",
          "target soft m=0.1": "decision target, soft, margin 0.1, T 0.1",
          "target majority": "decision target, majority verdicts",
          "relabel round": "relabelling round (BPO model annotates, anneal, BPO)"}  # the table's names where they differ
PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "thinking_cost_frontier_results.json"
FRESH_SEED = 20261204  # a seed no other part of the project draws the world with
HALF = 0.5  # auto mode's own decision served with the suffix in the prompt: the likelier of think and no_think
GOAL = {"max_drop": 1.0, "token_share": 0.4, "level1_thinking": 0.10, "top_level_thinking": 0.80}  # issue 37's


def run_bpo(start: Path, demo: Path, out: Path, seed: int, setting: dict) -> Path:
    demo_values = recipe_values("demo")
    group = recipe_values("tiny_bpo")["num_generations"]
    steps = setting.get("max_steps", demo_values["bpo_steps"])
    values = {"max_steps": steps, "per_device_train_batch_size": group * demo_values["bpo_prompts"],
              "probe_steps": steps // 10, "mode_token_loss": demo_values["bpo_mode_token_loss"],
              "beta": demo_values["bpo_beta"], **setting}
    cfg = load_recipe(BPOConfig, "tiny_bpo", model_path=str(start), train_files=[str(demo / "data" / "train.jsonl")],
                      probe_files=[str(demo / "data" / "eval.jsonl")], output_dir=str(out), seed=seed, report_to=[],
                      save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, **values)
    return train_to_final(cfg, out)


def relabel_round(start: Path, demo: Path, out: Path, seed: int, setting: dict) -> Path:
    """R-4B's heuristic applied to the model it produced: `start` (a BPO model) annotates the demo's train split
    (tiny_curate: N non-thinking answers sampled per query, thinking where at most k are right), is annealed on
    that mix for the setting's relabel_anneal_steps, and BPO (the rest of the setting) runs from the result."""
    from bimode.curate import CurateConfig, run_curation
    from bimode.generation.backends import build_backend

    setting = dict(setting)
    del setting["relabel_from"]
    steps = setting.pop("relabel_anneal_steps")
    curated = out / "relabelled"
    if not (curated / "summary.json").exists():
        run_curation(build_backend(str(start)), [demo / "data" / "train.jsonl"], curated,
                     load_recipe(CurateConfig, "tiny_curate", seed=seed, annotator_name=f"BPO model {start}"),
                     progress=False)
    annealed = out / "reannealed"
    if not (annealed / "final" / "config.json").exists():
        anneal_tiny(start, [curated / "curated.jsonl"], annealed, steps, seed)
    return run_bpo(annealed / "final", demo, out / "bpo", seed, setting)


def evaluate(model_dir: Path, bench: Path, out: Path) -> tuple[list[dict], list[dict]]:
    """The three modes' samples (run unless out/ has them), and auto mode's at think_threshold 0.5 (HALF, in
    out/half)."""
    if not (out / "samples.jsonl").exists():
        tiny_eval_samples(model_dir, bench, out, ["auto", "think", "no_think"])
    if not (out / "half" / "samples.jsonl").exists():
        tiny_eval_samples(model_dir, bench, out / "half", ["auto"], think_threshold=HALF)
    return read_samples(out / "samples.jsonl"), read_samples(out / "half" / "samples.jsonl")


def summarize(rows: list[dict], decision_counts: dict[str, int], half: list[dict] = ()) -> dict:
    """One run's figures on one split; decision_counts: modes.decision_tokens of the model's tokenizer; half: its
    auto mode's samples at think_threshold 0.5."""
    bench = next(iter(group_metrics(rows)["benchmarks"].values()))
    auto, think = bench["modes"]["auto"], bench["modes"]["think"]
    oracle = oracle_summary(rows, decision_counts)
    level1 = bench["by_level"][min(bench["by_level"], key=int)]["modes"]["auto"]["thinking_rate"]
    out = {"auto_accuracy": auto["accuracy"], "auto_tokens": auto["tokens"], "auto_thinking": auto["thinking_rate"],
           "think_accuracy": think["accuracy"], "think_tokens": think["tokens"],
           "no_think_accuracy": bench["modes"]["no_think"]["accuracy"],
           "token_share": auto["tokens"] / think["tokens"], "level1_thinking": level1,
           "thinking_by_level": {lv: m["modes"]["auto"]["thinking_rate"] for lv, m in bench["by_level"].items()},
           "oracle_accuracy": oracle["accuracy"], "oracle_share": oracle["tokens"] / think["tokens"],
           # the oracle's choices charged as auto mode pays (its decision, a direct answer's closing tags), and
           # every question answered directly so charged: the least a router's auto mode can spend
           "oracle_share_as_auto": oracle["tokens_as_auto"] / think["tokens"],
           "all_direct_share_as_auto": (bench["modes"]["no_think"]["tokens"] + decision_counts["no_think"])
           / think["tokens"],
           "oracle_thinking_by_level": {lv: m["oracle"]["thinking_rate"] for lv, m in bench["by_level"].items()},
           "decision_agreement": bench["selection"]["hybrid_accuracy"]}
    # auto mode's own decision served as a threshold is (p_think read from the prompt's pass, the chosen mode's
    # suffix written into the prompt, so neither the decision nor the closing tags are generated): threshold 0.5,
    # the likelier of the two decisions, measured as its own eval run (evaluate)
    if half:
        out["served_accuracy"] = mean(float(r["score"]) for r in half)
        out["served_share"] = mean(r["tokens"] for r in half) / think["tokens"]
        out["served_thinking"] = mean(1.0 if r["thought"] else 0.0 for r in half)
    family = routing_explained_by(rows, "family")
    out["family_routing"], out["oracle_family_routing"] = family.get("auto"), family.get("oracle")
    top = out["thinking_by_level"][max(out["thinking_by_level"], key=int)]
    out["goal_met"] = (out["auto_accuracy"] >= out["think_accuracy"] - GOAL["max_drop"] / 100
                       and out["token_share"] <= GOAL["token_share"] and level1 <= GOAL["level1_thinking"]
                       and top >= GOAL["top_level_thinking"])
    return out


def calibrated(pick_rows: list[dict], fresh_rows: list[dict], confidence: float) -> dict:
    result = calibrate(pick_rows, max_drop=GOAL["max_drop"], holdout_rows=fresh_rows, confidence=confidence, seed=0)
    held = result["holdout"]
    return {"threshold": result["threshold"], "confidence": confidence, "met_on_fresh": result["met_on_holdout"],
            "fresh_accuracy": held["calibrated"]["accuracy"], "fresh_think_accuracy": held["think"]["accuracy"],
            "fresh_token_share": held["calibrated"]["tokens"] / held["think"]["tokens"],
            "fresh_difference": held["difference"]}


def fresh_split(demo: Path, out: Path, n: int) -> Path:
    families = sorted({r.family for r in read_records(demo / "data" / "eval.jsonl")})  # the demo run's world
    records = [replace(s.to_record(), id=f"fresh-{s.to_record().id}")
               for s in synthetic.generate(n, FRESH_SEED, "eval", families=families)]
    known = {r.id for r in read_records(demo / "data" / "eval.jsonl")}
    assert not known & {r.id for r in records}
    return write_records(records, out / "fresh.jsonl", overwrite=True)


def measure(entry: dict, model: Path, run_dir: Path, benches: dict[str, Path], counts: dict[str, int]) -> None:
    """A run's figures on the eval and fresh splits (evaluated unless run_dir has the samples), and its threshold
    picked on the eval split and checked on the fresh one, into its results entry."""
    (pick, pick_half), (check, check_half) = (evaluate(model, benches[part], run_dir / part)
                                              for part in ("eval", "eval_fresh"))
    entry["eval"], entry["fresh"] = summarize(pick, counts, pick_half), summarize(check, counts, check_half)
    if "calibrated" not in entry:
        entry["calibrated"] = [calibrated(pick, check, c) for c in (0.0, 0.95)]


def final_model(out: Path, name: str, seed: int) -> Path:
    """Where a setting's run keeps its final model (a relabelling round's is its second BPO's)."""
    run_dir = run_directory(out, name, seed)
    return run_dir / "bpo" / "final" if "relabel_from" in SETTINGS[name] else run_dir / "final"


def train_once(start: Path, demo: Path, out: Path, name: str, seed: int) -> Path:
    """The final model of a BPO setting and seed, trained unless its folder already holds it."""
    run_dir = run_directory(out, name, seed)
    if not (run_dir / "final" / "config.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        run_bpo(start, demo, run_dir, seed, SETTINGS[name])
    return run_dir / "final"


def run_directory(out: Path, setting: str, seed: int) -> Path:
    return out / setting.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "") / f"seed{seed}"


def direct_sampling_check(model_dir: Path, eval_dir: Path, bench: Path, samples: int = 8) -> str:
    """Where the learned router thinks but a threshold need not: per level, the questions auto mode thought on,
    split by whether the greedy direct answer (what the eval scores) is right, and how often a direct answer
    sampled at temperature 1 (what BPO's rollouts see) is right on them."""
    from bimode.generation.types import Prompt, SamplingParams
    from bimode.scoring import accuracy_reward

    rows = read_samples(eval_dir / "samples.jsonl")
    by_id: dict[str, dict] = {}
    for r in rows:
        by_id.setdefault(r["id"], {})[r["mode"]] = r
    records = {r.id: r for r in read_records(bench)}
    chosen = [(records[i], m) for i, m in by_id.items() if m["auto"]["thought"] and m["think"]["level"] >= 4]
    model, processor = load_model(model_dir, dtype=torch.float32)
    engine = TransformersEngine(model, processor, max_batch_rows=96)
    params = SamplingParams(max_new_tokens=recipe_values("tiny_eval")["max_new_tokens"], temperature=1.0, seed=0)
    groups = engine.generate([Prompt.from_record(r, ["no_think"] * samples) for r, _ in chosen], params)
    table: dict[tuple[int, bool], list[float]] = {}
    for (record, modes), group in zip(chosen, groups):
        right = sum(accuracy_reward(c.prompt_suffix + c.text, record.answer, record.answer_type, record.choices)
                    for c in group) / len(group)
        table.setdefault((record.level, modes["no_think"]["score"] >= 1), []).append(right)
    lines = [f"| level | greedy direct answer | questions auto thinks on | sampled direct answers right (T=1, "
             f"{samples} each) |", "|---|---|---|---|"]
    for (level, greedy_right), values in sorted(table.items()):
        lines.append(f"| {level} | {'right' if greedy_right else 'wrong'} | {len(values)} | "
                     f"{100 * mean(values):.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished `bimode demo` run (its annealed model, data)")
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--n-fresh", type=int, default=600)
    parser.add_argument("--table-only", nargs="?", const=str(PUBLISHED), default=None, metavar="RESULTS_JSON",
                        help="no runs: print the ranges table from a results file (default: the published one, "
                             "docs/thinking_cost_frontier_results.json)")
    parser.add_argument("--markdown", metavar="PATH", help="with --table-only: also write the table to this file")
    parser.add_argument("--readme", metavar="PATH", help="with --table-only: write the ranges (no thresholds) into "
                        "this README between its thinking-cost-frontier markers")
    parser.add_argument("--diagnose", metavar="SETTING_SEED_DIR", help="instead of runs: for one finished run "
                        "(e.g. runs/frontier/BPO_paper/seed0), how often direct answers sampled at temperature 1 are "
                        "right on the level 4-6 questions its auto mode thinks on")
    args = parser.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    if args.table_only:
        text = ranges_document(json.loads(Path(args.table_only).read_text()), args.table_only,
                               args.markdown or "docs/thinking_cost_frontier.md")
        print(text, end="")
        if args.markdown:
            Path(args.markdown).write_text(text)
        if args.readme:
            readme = Path(args.readme)
            readme.write_text(readme_with_table(readme.read_text(), json.loads(Path(args.table_only).read_text()),
                                                args.table_only))
        return
    if args.diagnose:
        run = Path(args.diagnose)
        print(direct_sampling_check(run / "final", run / "eval", demo / "data" / "eval.jsonl"))
        return
    start = demo / "annealed"
    if not (start / "config.json").exists():
        raise SystemExit(f"no annealed model in {start}: run `make demo` (or `bimode demo --out {demo}`) first")
    out.mkdir(parents=True, exist_ok=True)
    fresh = fresh_split(demo, out, args.n_fresh)
    counts = decision_tokens(AutoTokenizer.from_pretrained(str(start)))  # every run shares the tiny tokenizer
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    benches = {"eval": demo / "data" / "eval.jsonl", "eval_fresh": fresh}
    measured_now = set()
    for name in args.settings:
        for seed in args.seeds:
            key = f"{name} | seed {seed}"
            if key in results:
                continue
            run_dir = run_directory(out, name, seed)
            began = time.time()
            setting, final = SETTINGS[name], final_model(out, name, seed)
            if "relabel_from" not in setting:
                train_once(start, demo, out, name, seed)
            elif not (final / "config.json").exists():
                relabel_round(train_once(start, demo, out, setting["relabel_from"], seed), demo, run_dir, seed, setting)
            entry = {"setting": name, "seed": seed}
            measure(entry, final, run_dir, benches, counts)
            entry["seconds"] = round(time.time() - began, 1)
            results[key] = entry
            measured_now.add(key)
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{key}: auto {100 * entry['eval']['auto_accuracy']:.1f} at "
                  f"{100 * entry['eval']['token_share']:.0f}% of think's tokens", flush=True)
    for key, entry in results.items():  # earlier runs again, for the fields added since they were measured
        run_dir = run_directory(out, entry["setting"], entry["seed"])
        if key in measured_now or not (run_dir / "eval_fresh" / "samples.jsonl").exists():
            continue  # a run whose folder is gone keeps the figures it was measured with
        measure(entry, final_model(out, entry["setting"], entry["seed"]), run_dir, benches, counts)
    results_path.write_text(json.dumps(results, indent=1))
    (out / "frontier.md").write_text(render(results) + "\n" + ranges_table(results))
    plot(results, out / "frontier.png")
    print(render(results) + "\n" + ranges_table(results))


def render(results: dict) -> str:
    lines = ["| setting | seed | auto acc | think acc | auto tokens (share of think) | L1 thinks | L6 thinks | "
             "oracle share (as auto pays) | decision agreement | family explains (auto / oracle) | goal met | "
             "fresh split: auto - think, share |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in results.values():
        e, f = entry["eval"], entry["fresh"]
        levels = e["thinking_by_level"]
        lines.append(f"| {entry['setting']} | {entry['seed']} | {100 * e['auto_accuracy']:.1f} | "
                     f"{100 * e['think_accuracy']:.1f} | {e['auto_tokens']:.1f} ({100 * e['token_share']:.0f}%) | "
                     f"{100 * e['level1_thinking']:.0f}% | {100 * levels[max(levels, key=int)]:.0f}% | "
                     f"{100 * e['oracle_share']:.0f}% ({percents(present([e], 'oracle_share_as_auto'))}) | "
                     f"{percents(present([e], 'decision_agreement'))} | "
                     f"{routing_cell([e])} | {'yes' if e['goal_met'] else 'no'} | "
                     f"{100 * (f['auto_accuracy'] - f['think_accuracy']):+.1f}, {100 * f['token_share']:.0f}% |")
    lines += ["", "Each model with a calibrated threshold (picked on the eval split, max_drop 1 point), on the fresh "
                  "split:", "",
              "| setting | seed | confidence | threshold | auto - think (95% interval) | share of think's tokens | met |",
              "|---|---|---|---|---|---|---|"]
    for entry in results.values():
        for c in entry.get("calibrated", []):
            d = c["fresh_difference"]
            lines.append(f"| {entry['setting']} | {entry['seed']} | {c['confidence']:g} | {c['threshold']:g} | "
                         f"{d['difference']:+.1f} "
                         f"[{d['low']:+.1f}, {d['high']:+.1f}] | {100 * c['fresh_token_share']:.0f}% | "
                         f"{'yes' if c['met_on_fresh'] else 'no'} |")
    by_setting: dict[str, list[dict]] = {}
    for entry in results.values():
        by_setting.setdefault(entry["setting"], []).append(entry["eval"])
    lines += ["", "| setting | runs | auto acc (mean) | auto - think (mean) | share of think's tokens (mean) | "
                  "L1 thinks (mean) | goal met |", "|---|---|---|---|---|---|---|"]
    for name, runs in by_setting.items():
        lines.append(f"| {name} | {len(runs)} | {100 * mean(r['auto_accuracy'] for r in runs):.1f} | "
                     f"{100 * mean(r['auto_accuracy'] - r['think_accuracy'] for r in runs):+.1f} | "
                     f"{100 * mean(r['token_share'] for r in runs):.0f}% | "
                     f"{100 * mean(r['level1_thinking'] for r in runs):.0f}% | "
                     f"{sum(r['goal_met'] for r in runs)} of {len(runs)} |")
    return "\n".join(lines) + "\n"


def points(values: list[float]) -> str:
    """A range of accuracy differences in points, signed, over seeds: "-0.5 to +1.2", one value when they agree."""
    def signed(x: float) -> str:
        text = f"{x:+.1f}"
        return "0.0" if text in ("+0.0", "-0.0") else text

    low, high = signed(min(values)), signed(max(values))
    return low if low == high else f"{low} to {high}"


def percents(values: list[float], none: str = "-") -> str:
    """A range of shares (0-1) in whole percents: "60-62%", one value when they agree (`none` for none)."""
    if not values:
        return none
    low, high = f"{100 * min(values):.0f}", f"{100 * max(values):.0f}"
    return f"{low}%" if low == high else f"{low}-{high}%"


def present(runs: list[dict], key: str) -> list[float]:
    """The runs' values of a field that runs measured before it existed lack (or that has no value: None)."""
    return [r[key] for r in runs if r.get(key) is not None]


def served_cell(runs: list[dict]) -> str:
    """Auto mode at think_threshold 0.5 (its own decision, served with the chosen mode's suffix in the prompt):
    accuracy against think's and the share of think's tokens, ranges over the runs; "-" for runs measured before
    it was."""
    runs = [r for r in runs if "served_share" in r]
    if not runs:
        return "-"
    return (f"{points([100 * (r['served_accuracy'] - r['think_accuracy']) for r in runs])}, "
            f"{percents([r['served_share'] for r in runs])}")


def routing_cell(runs: list[dict]) -> str:
    """How much of the decision the family label explains, auto mode's range over the runs / the oracle router's;
    blank for runs measured before it was (results without the fields)."""
    if not any("family_routing" in r for r in runs):
        return ""
    return f"{percents(present(runs, 'family_routing'))} / {percents(present(runs, 'oracle_family_routing'))}"


def level_table(by_setting: dict[str, list[dict]]) -> list[str]:
    """Auto mode's thinking rate per level (eval split), each setting's range over its seeds."""
    levels = sorted({lv for runs in by_setting.values() for r in runs for lv in r["eval"].get("thinking_by_level", {})},
                    key=int)
    if not levels:
        return []
    lines = ["", "Auto mode's thinking rate per level (eval split), range over seeds:", "",
             "| setting | " + " | ".join(f"L{lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
    for name, runs in by_setting.items():
        cells = [percents([r["eval"]["thinking_by_level"][lv] for r in runs
                           if lv in r["eval"].get("thinking_by_level", {})]) for lv in levels]
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    oracle = [r["eval"]["oracle_thinking_by_level"] for runs in by_setting.values() for r in runs
              if "oracle_thinking_by_level" in r["eval"]]
    if oracle:
        lines.append(f"| oracle router ({len(oracle)} models) | "
                     + " | ".join(percents([o[lv] for o in oracle if lv in o]) for lv in levels) + " |")
    return lines


def ranges_table(results: dict, thresholds: bool = True) -> str:
    """Per setting, the ranges over its seeds (eval split, and the fresh split; decision agreement and the family's
    share blank for runs measured before they were), then the oracle router over every run: the table
    docs/thinking_cost_frontier.md shows; then auto mode's thinking rate per level, and the calibrated thresholds'
    ranges on the fresh split."""
    by_setting: dict[str, list[dict]] = {name: [] for name in SETTINGS}  # in SETTINGS' order, the table's
    for entry in results.values():
        by_setting.setdefault(entry["setting"], []).append(entry)
    by_setting = {name: runs for name, runs in by_setting.items() if runs}
    seeds = {len(runs) for runs in by_setting.values()}
    lines = [f"| setting ({'/'.join(map(str, sorted(seeds)))} seeds) | auto - think, points | auto tokens, share of "
             "think's | level 1 thinks | decision agreement with the oracle | family explains (auto / oracle) | "
             "fresh split: auto - think, share | think_threshold 0.5 (its own decision, the suffix in the prompt): "
             "auto - think, share (eval; fresh) |", "|---|---|---|---|---|---|---|---|"]
    for name, runs in by_setting.items():
        e, f = [r["eval"] for r in runs], [r["fresh"] for r in runs]
        lines.append(f"| {LABELS.get(name, name)} | "
                     f"{points([100 * (r['auto_accuracy'] - r['think_accuracy']) for r in e])} | "
                     f"{percents([r['token_share'] for r in e])} | {percents([r['level1_thinking'] for r in e])} | "
                     f"{percents(present(e, 'decision_agreement'), none='')} | {routing_cell(e)} | "
                     f"{points([100 * (r['auto_accuracy'] - r['think_accuracy']) for r in f])}, "
                     f"{percents([r['token_share'] for r in f])} | {served_cell(e)}; {served_cell(f)} |")
    every = [entry["eval"] for entry in results.values()]
    lines.append(f"| oracle router (same models) | "
                 f"{points([100 * (r['oracle_accuracy'] - r['think_accuracy']) for r in every])} | "
                 f"{percents([r['oracle_share'] for r in every])} | | | | | |")
    as_auto = [r for r in every if "oracle_share_as_auto" in r]
    if as_auto:
        lines.append(f"| oracle router, charged as auto mode pays ({len(as_auto)} models) | | "
                     f"{percents([r['oracle_share_as_auto'] for r in as_auto])} | | | | | |")
        lines.append(f"| every question direct, charged as auto mode pays | | "
                     f"{percents([r['all_direct_share_as_auto'] for r in as_auto])} | | | | | |")
    lines += level_table(by_setting)
    calibrated = [(entry, c) for entry in results.values() for c in entry.get("calibrated", [])]
    if calibrated and thresholds:
        lines += ["", "Calibrated thresholds (picked on the eval split, max_drop 1 point), on the fresh split:", "",
                  "| setting | confidence | models meeting the goal | auto - think, points | share of think's tokens | "
                  "share, the models meeting it |", "|---|---|---|---|---|---|"]
        for name in [*by_setting, "all settings"]:
            for confidence in sorted({c["confidence"] for _, c in calibrated}, reverse=True):
                picked = [c for entry, c in calibrated if c["confidence"] == confidence
                          and name in (entry["setting"], "all settings")]
                lines.append(f"| {LABELS.get(name, name)} | {confidence:g} | "
                             f"{sum(c['met_on_fresh'] for c in picked)} of {len(picked)} | "
                             f"{points([c['fresh_difference']['difference'] for c in picked])} | "
                             f"{percents([c['fresh_token_share'] for c in picked])} | "
                             f"{percents([c['fresh_token_share'] for c in picked if c['met_on_fresh']])} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- thinking-cost-frontier:start (written by scripts/thinking_cost_frontier.py --readme) -->"
README_END = "<!-- thinking-cost-frontier:end -->"


def readme_with_table(readme: str, results: dict, source: str) -> str:
    """The README's text with the block between README_START and README_END replaced by the ranges (without the
    calibrated thresholds) and the command that wrote them; an error where the markers are missing."""
    if readme.count(README_START) != 1 or readme.count(README_END) != 1:
        raise SystemExit(f"the README needs one {README_START} and one {README_END} line to write the table between")
    head, rest = readme.split(README_START)
    tail = rest.split(README_END)[1]
    block = (f"\n```bash\n.venv/bin/python scripts/thinking_cost_frontier.py --table-only {source} --readme README.md"
             f"\n```\n\n" + ranges_table(results, thresholds=False))
    return head + README_START + "\n" + block + README_END + tail


def ranges_document(results: dict, source: str, markdown: str = "docs/thinking_cost_frontier.md") -> str:
    """The ranges table with where it came from and how to make it again (the plot: the page's name, .png)."""
    root = PUBLISHED.parents[1]
    path, page = Path(source).resolve(), Path(markdown).resolve()
    path = path.relative_to(root) if path.is_relative_to(root) else path
    shown = page.relative_to(root) if page.is_relative_to(root) else page
    return (f"# A cost of thinking: ranges over seeds\n\nFrom {path}: {len(results)} runs of BPO from the demo's "
            f"annealed model, each setting with several seeds (`scripts/thinking_cost_frontier.py --demo DEMO_RUN "
            f"--out OUT`; each run's command in docs/bpo.md). This page is that script's output:\n\n```bash\n.venv/bin/python "
            f"scripts/thinking_cost_frontier.py --table-only {path} --markdown {shown}\n```\n\n"
            f"![accuracy against tokens, one point per run]({page.with_suffix('.png').name})\n\n" + ranges_table(results))


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    markers = dict(zip(SETTINGS, "osD^vP<>hXdpH8P+x1234"))
    for name in SETTINGS:
        runs = [e["eval"] for e in results.values() if e["setting"] == name]
        if runs:
            ax.scatter([100 * r["token_share"] for r in runs], [100 * r["auto_accuracy"] for r in runs],
                       marker=markers[name], label=f"auto, {name}", s=40)
    oracle = [e["eval"] for e in results.values()]
    ax.scatter([100 * r["oracle_share"] for r in oracle], [100 * r["oracle_accuracy"] for r in oracle],
               marker="*", color="gray", label="oracle router (same models)", s=50)
    as_auto = [r for r in oracle if "oracle_share_as_auto" in r]
    if as_auto:
        ax.scatter([100 * r["oracle_share_as_auto"] for r in as_auto], [100 * r["oracle_accuracy"] for r in as_auto],
                   marker="*", color="black", label="oracle router, charged as auto mode pays", s=50)
    calib = [(c, e) for e in results.values() for c in e.get("calibrated", [])
             if c["confidence"] and e["setting"] == "BPO (paper)"]
    if calib:
        ax.scatter([100 * c["fresh_token_share"] for c, _ in calib], [100 * c["fresh_accuracy"] for c, _ in calib],
                   marker="x", color="black", label="plain BPO + calibrated threshold (fresh split)", s=40)
    think = mean(100 * e["eval"]["think_accuracy"] for e in results.values())
    ax.axhline(think - GOAL["max_drop"], color="red", lw=0.8, ls="--", label="mean think acc - 1 point")
    ax.axvline(100 * GOAL["token_share"], color="red", lw=0.8, ls=":", label="40% of think's tokens")
    ax.set_xlabel("auto tokens, % of think mode's (eval split)")
    ax.set_ylabel("accuracy %")
    ax.set_title("A cost of thinking in BPO: one point per run (embedded default)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
