"""R-4B's annealing ablation (paper Table 3) in miniature, on the embedded default.

Four annealing data regimes at equal step budget, each from the same tiny model, evaluated in think and
no_think mode on the held-out eval split (plus auto mode for the mixed one):
  non-reasoning only   samples that do not need reasoning, with direct-answer targets
  reasoning only       samples that need reasoning, with trace targets
  NR then R            the first half of the steps on the first set, the second half on the second
  mixed                both sets together, each sample in its own mode
Which samples "need reasoning" is decided by the world's ground truth (shell and shell_text from level 2,
tally from level 3), not by curation, so the comparison isolates annealing.

    .venv/bin/python scripts/anneal_table3.py --out runs/table3 [--steps 600] [--n-train 3000]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.demo import anneal_tiny as anneal
from bimode.demo import evaluate_tiny as evaluate
from bimode.demo import needs_reasoning
from bimode.models.tiny import build_tiny


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/table3")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = [s.to_record() for s in synthetic.generate(args.n_train, args.seed, "train")]
    reasoning = [replace(r, mode="think") for r in train if needs_reasoning(r)]
    direct = [replace(r, mode="no_think") for r in train if not needs_reasoning(r)]
    write_records(reasoning, out / "reasoning.jsonl", overwrite=True)
    write_records(direct, out / "non_reasoning.jsonl", overwrite=True)
    bench = write_records([s.to_record() for s in synthetic.generate(args.n_eval, args.seed, "eval")],
                          out / "eval.jsonl", overwrite=True)
    base = build_tiny(out / "tiny") if not (out / "tiny" / "config.json").exists() else out / "tiny"
    half = args.steps // 2
    runs = {
        "non-reasoning only": lambda d: anneal(base, [out / "non_reasoning.jsonl"], d, args.steps, args.seed),
        "reasoning only": lambda d: anneal(base, [out / "reasoning.jsonl"], d, args.steps, args.seed),
        "NR then R": lambda d: anneal(anneal(base, [out / "non_reasoning.jsonl"], d / "stage1", half, args.seed),
                                      [out / "reasoning.jsonl"], d, args.steps - half, args.seed),
        "mixed": lambda d: anneal(base, [out / "non_reasoning.jsonl", out / "reasoning.jsonl"], d, args.steps,
                                  args.seed),
    }
    results = {}
    for name, run in runs.items():
        directory = out / name.replace(" ", "_")
        model_dir = directory / "final"
        if not (model_dir / "config.json").exists():
            model_dir = run(directory)
        modes = ("think", "no_think", "auto") if name == "mixed" else ("think", "no_think")
        results[name] = evaluate(model_dir, bench, directory / "eval", modes)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    levels = sorted(results["mixed"]["by_level"], key=int)
    print(f"n_train={args.n_train} ({len(reasoning)} reasoning, {len(direct)} non-reasoning), steps={args.steps}, "
          f"eval n={args.n_eval}, seed={args.seed}\n")
    print("| annealing data | think acc | no_think acc | " + " | ".join(f"think L{lv}" for lv in levels) + " |")
    print("|---|---|---|" + "---|" * len(levels))
    for name, m in results.items():
        by_level = " | ".join(f"{100 * m['by_level'][lv]['modes']['think']['accuracy']:.0f}" for lv in levels)
        print(f"| {name} | {100 * m['modes']['think']['accuracy']:.1f} | {100 * m['modes']['no_think']['accuracy']:.1f}"
              f" | {by_level} |")
    mixed = results["mixed"]
    print("\nMixed, per level: no_think / think / auto accuracy, auto thinking rate")
    print("| level | no_think | think | auto | auto thinks |\n|---|---|---|---|---|")
    for lv in levels:
        g = mixed["by_level"][lv]["modes"]
        print(f"| {lv} | {100 * g['no_think']['accuracy']:.0f} | {100 * g['think']['accuracy']:.0f} | "
              f"{100 * g['auto']['accuracy']:.0f} | {100 * g['auto']['thinking_rate']:.0f}% |")
    a = mixed["modes"]
    print(f"| all | {100 * a['no_think']['accuracy']:.1f} | {100 * a['think']['accuracy']:.1f} | "
          f"{100 * a['auto']['accuracy']:.1f} | {100 * a['auto']['thinking_rate']:.0f}% |")


if __name__ == "__main__":
    main()
