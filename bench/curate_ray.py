"""Curation rows per second: one process against Ray with 1 and 2 workers, and the cost of a run killed half way
and resumed (issue 23, item 5).

Each side is the `bimode curate` command as a user runs it, in its own child process, one after the other, on the
same records, annotator and settings (the tiny_curate recipe: N = 8 sampled answers of up to 8 tokens per query):

  single    bimode curate ...                                   (this process's torch threads: all cores)
  ray_1     ... --ray_address local --num_workers 1 --ray_cpus_per_worker 2   (one actor with every core)
  ray_2     ... --ray_address local --num_workers 2             (two actors of one core each)
  resumed   single, SIGKILLed once half the batches are logged, then the same command again

Reported per side: wall time from start to exit, rows per second over it, the start-up (until the first batch
is logged: imports, model loading, Ray's start and its actors) and the steady rate (rows of the batches logged
after the first, over the time between the first and the last batch). Every side's curated.jsonl must equal the
single process's, byte for byte, or the bench stops.

    .venv/bin/python -m bench.curate_ray [--annotator runs/demo/annotator] [--rows 2048] [--batch-size 64] \\
        [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parents[1]


def run_side(command: list[str], out: Path, kill_at: int | None = None) -> dict:
    """Run one curation command, watching its batch log; with kill_at, SIGKILL it once that many batches are in."""
    log = out / "batches.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    seen, stamps = (log.read_text().count("\n") if log.exists() else 0), []  # a resumed run's earlier batches
    while proc.poll() is None:
        lines = log.read_text().count("\n") if log.exists() else 0
        if lines > seen:
            stamps += [time.perf_counter() - start] * (lines - seen)
            seen = lines
            if kill_at is not None and seen >= kill_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return {"seconds": time.perf_counter() - start, "stamps": stamps, "killed": True}
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
    lines = log.read_text().count("\n")
    stamps += [seconds] * (lines - seen)  # batches logged after the last look
    return {"seconds": seconds, "stamps": stamps, "killed": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotator", default="runs/demo/annotator")
    parser.add_argument("--input", default="runs/demo/data/train.jsonl")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="curate_ray_"))
    source = Path(args.input).resolve()
    rows = [json.loads(line) for line in source.read_text().splitlines()[:args.rows]]
    for row in rows:  # image paths relative to the input file, made absolute for the copy
        row["images"] = [str(source.parent / i) if isinstance(i, str) else i for i in row.get("images") or []]
    (work / "input.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = [sys.executable, "-m", "bimode.cli", "curate", "--config", "tiny_curate", "--input",
            str(work / "input.jsonl"), "--annotator", args.annotator, "--batch_size", str(args.batch_size)]
    sides = {"single": [], "ray_1": ["--ray_address", "local", "--num_workers", "1", "--ray_cpus_per_worker", "2"],
             "ray_2": ["--ray_address", "local", "--num_workers", "2"]}
    results = {}
    for name, extra in sides.items():
        out = work / name
        results[name] = run_side(base + ["--out", str(out)] + extra, out)
    n_batches = len(results["single"]["stamps"])
    out = work / "resumed"
    killed = run_side(base + ["--out", str(out)], out, kill_at=n_batches // 2)
    if not killed["killed"]:
        raise SystemExit("the run ended before half its batches were logged: give more --rows")
    resumed = run_side(base + ["--out", str(out)], out)
    results["resumed"] = {"seconds": killed["seconds"] + resumed["seconds"], "killed_s": killed["seconds"],
                          "resumed_s": resumed["seconds"], "batches_before_kill": len(killed["stamps"]),
                          "stamps": resumed["stamps"]}
    reference = (work / "single" / "curated.jsonl").read_text()
    for name in results:
        if (work / name / "curated.jsonl").read_text() != reference:
            raise SystemExit(f"{name}: curated.jsonl differs from the single process's")
    curated = json.loads((work / "single" / "summary.json").read_text())["total"]
    n_rows = len(rows)
    labels = {"single": "one process (torch on every core)", "ray_1": "Ray, 1 actor (`--ray_cpus_per_worker 2`)",
              "ray_2": "Ray, 2 actors (one core each)"}
    single = results["single"]["seconds"]
    cells = []
    for name in ("single", "ray_1", "ray_2"):
        r = results[name]
        stamps = r["stamps"]
        steady = (n_rows * (len(stamps) - 1) / len(stamps)) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        cells.append([labels[name], f"{r['seconds']:.1f}", f"{n_rows / r['seconds']:.1f}",
                      f"{single / r['seconds']:.2f}x", f"{stamps[0]:.1f}", f"{steady:.1f}"])
    r = results["resumed"]
    report.emit(
        f"{n_rows:,} rows, {n_batches} batches of {args.batch_size}; curated {curated['curated']:,} "
        f"({curated['think']} thinking), rejected {curated['rejected']}; every side's `curated.jsonl` identical to the "
        f"single process's, byte for byte (the bench checks it).\n\n"
        + report.table(["side", "wall (s)", "rows/s", "vs single", "start-up to first batch (s)",
                        "steady rows/s (after the first batch)"], cells)
        + f"\nResumed run: the single-process command SIGKILLed once {r['batches_before_kill']} of {n_batches} batches "
        f"were logged ({r['killed_s']:.1f} s), then the same command again: {r['resumed_s']:.1f} s (the "
        f"{len(r['stamps'])} missing batches; {r['stamps'][0]:.1f} s to its first). Killed + resumed: "
        f"{r['seconds']:.1f} s, {r['seconds'] / single:.2f}x the uninterrupted {single:.1f} s.\n",
        args.markdown, libraries=("torch", "transformers", "ray"))


if __name__ == "__main__":
    main()
