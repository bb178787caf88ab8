"""R-4B's RL results in miniature, on the embedded default: BPO versus plain GRPO versus no RL.

Start: the tiny model annealed on every training record in both formats (`target_modes: both`), so it can
answer either way but has no learned preference for when to think. From it, at equal rollout budget
(steps x prompts x rollouts), this runs
  BPO, mode_token_loss on / off / 0.3   g forced-thinking + g forced-non-thinking rollouts, mixed groups
  GRPO (rollout auto)                   2g auto-mode rollouts, the model picks its mode
and evaluates every model in auto, think and no_think mode on the held-out eval split. The p_think probe
(every 10 steps, eval records) gives the auto-mode thinking rate per level over training.

    .venv/bin/python scripts/bpo_miniature.py --out runs/bpo_mini [--steps 120]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.demo import anneal_tiny as anneal
from bimode.demo import evaluate_tiny as evaluate
from bimode.demo import train_to_final
from bimode.models.tiny import build_tiny
from bimode.recipes import load_recipe
from bimode.train.bpo.trainer import BPOConfig

RUNS = {
    "BPO, mode tokens on": dict(rollout="bimode", mode_token_loss="on"),
    "BPO, mode tokens off": dict(rollout="bimode", mode_token_loss="off"),
    "BPO, mode tokens 0.3": dict(rollout="bimode", mode_token_loss="0.3"),
    "GRPO (auto rollouts)": dict(rollout="auto"),
}


def rl(start: Path, train: Path, probe: Path, out: Path, steps: int, seed: int, **setting) -> Path:
    cfg = load_recipe(BPOConfig, "tiny_bpo", model_path=str(start), train_files=[str(train)],
                      probe_files=[str(probe)], output_dir=str(out), max_steps=steps, report_to=[],
                      save_strategy="no", seed=seed, use_cpu=not torch.cuda.is_available(), **setting)
    return train_to_final(cfg, out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bpo_mini")
    parser.add_argument("--anneal-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--start", help="an annealed model to start from instead of annealing in both formats "
                                        "(e.g. runs/table3/mixed/final from scripts/anneal_table3.py)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = write_records([s.to_record() for s in synthetic.generate(args.n_train, args.seed, "train")],
                          out / "train.jsonl", overwrite=True)
    bench = write_records([s.to_record() for s in synthetic.generate(args.n_eval, args.seed, "eval")],
                          out / "eval.jsonl", overwrite=True)
    base = out / "tiny" if (out / "tiny" / "config.json").exists() else build_tiny(out / "tiny")
    start = Path(args.start) if args.start else out / "annealed" / "final"
    if not (start / "config.json").exists() and not args.start:
        anneal(base, [train], out / "annealed", args.anneal_steps, args.seed, target_modes="both")
    modes = ("auto", "think", "no_think")
    results = {"no RL (annealed)": evaluate(start, bench, out / "annealed" / "eval", modes)}
    (out / "start.txt").write_text(str(start) + "\n")
    for name in args.runs:
        directory = out / name.split(",")[0].split(" (")[0].lower() / name.replace(" ", "_").replace(",", "")
        model_dir = directory / "final"
        if not (model_dir / "config.json").exists():
            model_dir = rl(start, train, bench, directory, args.steps, args.seed, **RUNS[name])
        results[name] = evaluate(model_dir, bench, directory / "eval", modes)
        results[name]["probe"] = [json.loads(x) for x in (directory / "probe.jsonl").read_text().splitlines()]
        history = json.loads((directory / "log_history.json").read_text())
        results[name]["think_share"] = [(h["step"], h["bpo/think_share"]) for h in history if "bpo/think_share" in h]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results, args)


def print_tables(results: dict, args) -> None:
    print(f"n_train={args.n_train}, eval n={args.n_eval}, RL steps={args.steps} x 8 prompts x 8 rollouts, "
          f"seed={args.seed}\n")
    print("| model | auto acc | think acc | no_think acc | auto thinks | auto tokens | think tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, m in results.items():
        a, t, n = (m["modes"][k] for k in ("auto", "think", "no_think"))
        print(f"| {name} | {100 * a['accuracy']:.1f} | {100 * t['accuracy']:.1f} | {100 * n['accuracy']:.1f} | "
              f"{100 * a['thinking_rate']:.0f}% | {a['tokens']:.1f} | {t['tokens']:.1f} |")
    levels = sorted(next(iter(results.values()))["by_level"], key=int)
    print("\nAuto-mode thinking rate per level (eval split)")
    print("| model | " + " | ".join(f"L{lv}" for lv in levels) + " |\n|---|" + "---|" * len(levels))
    for name, m in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * m['by_level'][lv]['modes']['auto']['thinking_rate']:.0f}%"
                                          for lv in levels) + " |")
    for name, m in results.items():
        if "probe" in m:
            print(f"\n{name}: probe think_rate by step (L1 / L3 / L6), think share of rollouts")
            shares = dict(m["think_share"])
            for p in m["probe"]:
                share = shares.get(p["step"])
                print(f"  step {p['step']:4d}: " + " / ".join(f"{100 * p.get(f'think_rate/level_{lv}', 0):.0f}%"
                                                            for lv in (1, 3, 6))
                      + (f"   rollouts thinking {100 * share:.0f}%" if share is not None else ""))


if __name__ == "__main__":
    main()
