"""The demo's headline numbers over several seeds, and whether a re-run reproduces a run exactly.

    .venv/bin/python scripts/demo_seeds.py --out runs/demo_seeds [--seeds 0 1 2] [--repeat 0] [--quick]

Runs the whole demo (`bimode demo --seed S`) once per seed, each in its own folder (a finished stage is
reused, so an interrupted run resumes). With `--repeat S` it runs seed S a second time from scratch in
another folder and compares every stage's output byte for byte: the same machine, the same seed. Writes
seeds.json and seeds.md (the table the README quotes) into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

from bimode.recipes import load_recipe
from bimode.demo import DemoConfig, run_demo

# what each stage leaves that a re-run should reproduce
STAGE_OUTPUTS = {
    "world": "data/train.jsonl",
    "annotator warm-up": "annotator/model.safetensors",
    "curation": "curation/curated.jsonl",
    "annealing": "annealed/model.safetensors",
    "BPO": "bpo/model.safetensors",
    "evaluation (bpo)": "eval_bpo/samples.jsonl",
}


def headline(run: Path) -> dict:
    """The numbers the README's demo table leads with, from a finished run's metrics."""
    out = {}
    for name in ("annealed", "bpo"):
        metrics = json.loads((run / f"eval_{name}" / "metrics.json").read_text())
        bench = next(iter(metrics["benchmarks"].values()))
        modes, levels = bench["modes"], sorted(bench["by_level"], key=int)
        easy, hard = bench["by_level"][levels[0]]["modes"], bench["by_level"][levels[-1]]["modes"]
        out[name] = {
            "no_think_acc": 100 * modes["no_think"]["accuracy"],
            "think_acc": 100 * modes["think"]["accuracy"],
            "auto_acc": 100 * modes["auto"]["accuracy"],
            "auto_thinks": 100 * modes["auto"]["thinking_rate"],
            f"auto_thinks_level_{levels[0]}": 100 * easy["auto"]["thinking_rate"],
            f"auto_thinks_level_{levels[-1]}": 100 * hard["auto"]["thinking_rate"],
            "auto_tokens_share_of_think": 100 * modes["auto"]["tokens"] / max(modes["think"]["tokens"], 1e-9),
        }
    timings = json.loads((run / "timings.json").read_text())
    out["seconds"] = round(sum(timings.values()))
    return out


def digests(run: Path) -> dict[str, str]:
    return {stage: hashlib.sha256((run / rel).read_bytes()).hexdigest()[:16]
            for stage, rel in STAGE_OUTPUTS.items() if (run / rel).exists()}


def table(results: dict[str, dict]) -> list[str]:
    """Markdown: one row per headline number, one column per seed, then the range over seeds."""
    seeds = list(results)
    lines = ["| model | number | " + " | ".join(f"seed {s}" for s in seeds) + " | range |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    for name in ("annealed", "bpo"):
        for key in results[seeds[0]][name]:
            values = [results[s][name][key] for s in seeds]
            lines.append(f"| {name} | {key} | " + " | ".join(f"{v:.1f}" for v in values)
                         + f" | {min(values):.1f} - {max(values):.1f} |")
    values = [results[s]["seconds"] for s in seeds]
    lines.append("| all stages | seconds | " + " | ".join(str(v) for v in values)
                 + f" | {min(values)} - {max(values)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_seeds"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=None, help="run this seed twice and compare the outputs")
    parser.add_argument("--quick", action="store_true", help="the demo's quick sizes (a smoke run)")
    args = parser.parse_args(argv)
    recipe = "demo_quick" if args.quick else "demo"  # configs/recipes
    args.out.mkdir(parents=True, exist_ok=True)
    results, hashes = {}, {}
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        run_demo(load_recipe(DemoConfig, recipe, out=str(run), seed=seed))
        results[str(seed)], hashes[str(seed)] = headline(run), digests(run)
    report = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "results": results, "digests": hashes}
    lines = [f"# The demo over seeds ({'quick' if args.quick else 'full'} sizes)", "",
             f"Command: `.venv/bin/python scripts/{report['command']}`, {report['date']}, {report['machine']}.", ""]
    lines += table(results)
    if args.repeat is not None:
        run = args.out / f"seed{args.repeat}_repeat"
        run_demo(load_recipe(DemoConfig, recipe, out=str(run), seed=args.repeat))
        first, again = hashes.get(str(args.repeat)) or digests(args.out / f"seed{args.repeat}"), digests(run)
        same = {stage: first.get(stage) == again.get(stage) for stage in STAGE_OUTPUTS}
        report["repeat"] = {"seed": args.repeat, "identical": same, "results": headline(run)}
        lines += ["", f"Seed {args.repeat} run again from scratch on the same machine, each stage's output "
                  "compared byte for byte:", ""]
        lines += [f"- {stage}: {'identical' if ok else 'differs'}" for stage, ok in same.items()]
    (args.out / "seeds.json").write_text(json.dumps(report, indent=1))
    (args.out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
