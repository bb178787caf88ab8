"""The curation and eval driver's memory per input row: reading, deduplication and batch cutting, without the model
(issue 39, item 5).

Each side runs in a child process of its own on the same generated text rows (a .jsonl of questions of 12 to 30
words from a 5,000-word vocabulary, with gold answers; 4% repeat an earlier question with other case and
punctuation, 4% repeat one with a word added: near-duplicates at a trigram Jaccard similarity of 0.9 or more):

  held      the driver before issue 39: every record read into a list, exact duplicates found in a dict (its
            near-duplicate search compared each question with every earlier one: hours at 100k rows, so it is left
            out here, which flatters this side)
  curate    `run_curation` as `bimode curate` runs it, each batch handed to a pool that returns no rows (what the
            model does is not measured): stream, exact and MinHash near-duplicates on the disk index, batches of 16
  eval      `run_eval` likewise (ids checked on the disk index, batches of 32, one mode)

Reported per side and row count: the child's peak resident memory (ru_maxrss) less that of a child that imports the
same modules and reads nothing, that over the row count, the wall time and rows per second, and for the streaming
sides the size of the scratch index on disk at the end of reading. The index's SQLite page cache (64 MiB) fills over
the first few hundred thousand rows, so the growth per row is taken between the two largest runs; the figure for
R-4B's 16.3M rows is the largest run's peak plus that growth times the rows it lacks.

    .venv/bin/python -m bench.driver_memory [--rows 100000,1000000,5000000] [--held-rows 100000,1000000] \\
        [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report

R4B_ROWS = 16_300_000


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    questions: list[str] = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            roll = rng.random()
            if questions and roll < 0.04:
                question = rng.choice(questions[-1000:]).upper() + "?"
            elif questions and roll < 0.08:
                question = rng.choice(questions[-1000:]) + " " + rng.choice(vocabulary)
            else:
                question = " ".join(rng.choices(vocabulary, k=rng.randint(12, 30)))
                questions.append(question)
                if len(questions) > 2000:
                    questions = questions[-1000:]
            fh.write(json.dumps({"id": f"r{i}", "question": question, "answer": str(i % 10),
                                 "answer_type": "numeric"}) + "\n")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side(name: str, rows_file: Path, work: Path) -> dict:
    """One side in this (child) process."""
    from bimode.curate.pipeline import CurateConfig, run_curation
    from bimode.data.convert import iter_converted
    from bimode.eval.runner import EvalConfig, run_eval
    from bimode.parallel.pool import LocalPool

    start = time.time()
    index_bytes = None
    if name == "held":
        records = list(iter_converted(rows_file))
        seen: dict[str, str] = {}
        duplicates = {r.id: seen.setdefault(r.question.lower(), r.id) for r in records}
        assert len(duplicates) == len(records)
    elif name == "curate":
        def batch(records):
            nonlocal index_bytes
            found = work / "curate" / ".curate_index.sqlite"
            index_bytes = found.stat().st_size if found.exists() else index_bytes
            return [], []

        run_curation(None, [rows_file], work / "curate", CurateConfig(batch_size=16), progress=False,
                     pool=LocalPool(batch))
    elif name == "eval":
        def batch(chunk):
            nonlocal index_bytes
            found = work / "eval" / ".eval_index.sqlite"
            index_bytes = found.stat().st_size if found.exists() else index_bytes
            return []

        run_eval(None, [rows_file], work / "eval", EvalConfig(modes=["no_think"], batch_size=32), progress=False,
                 pool=LocalPool(batch))
    elif name != "idle":
        raise ValueError(name)
    return {"side": name, "peak_mib": peak_mib(), "seconds": time.time() - start, "index_bytes": index_bytes}


def run_child(name: str, rows_file: Path, work: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.driver_memory", "--child", name, str(rows_file), str(work)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"side {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100000,1000000,5000000")
    parser.add_argument("--held-rows", default="100000,1000000")
    parser.add_argument("--child", nargs=3, metavar=("SIDE", "ROWS_FILE", "WORK"), help=argparse.SUPPRESS)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(side(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    sizes = sorted(int(n) for n in args.rows.split(","))
    held = {int(n) for n in args.held_rows.split(",") if n}
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        idle = None
        for rows in sizes:
            rows_file = Path(tmp) / f"rows_{rows}.jsonl"
            write_rows(rows_file, rows)
            idle = idle or run_child("idle", rows_file, Path(tmp))
            for name in (["held"] if rows in held else []) + ["curate", "eval"]:
                work = Path(tmp) / f"{name}_{rows}"
                results[name, rows] = run_child(name, rows_file, work)
                print(f"{name} {rows:,}: {results[name, rows]}", file=sys.stderr, flush=True)
            rows_file.unlink()
    lines = []
    for (name, rows), r in results.items():
        driver = r["peak_mib"] - idle["peak_mib"]
        lines.append([name, f"{rows:,}", f"{driver:,.0f}", f"{driver * 2**20 / rows:,.0f}", f"{r['seconds']:,.0f}",
                      f"{rows / r['seconds']:,.0f}",
                      "" if r["index_bytes"] is None else f"{r['index_bytes'] / 2**20:,.0f}"])
    text = report.table(["side", "rows", "driver peak MiB (over idle)", "bytes/row", "s", "rows/s",
                         "index on disk MiB"], lines)
    notes = [f"idle child (imports only): {idle['peak_mib']:,.0f} MiB peak."]
    small, large = sizes[-2:] if len(sizes) > 1 else sizes * 2  # growth past the index's page cache filling
    for name in ("curate", "eval"):
        a, b = results[name, small], results[name, large]
        growth = (b["peak_mib"] - a["peak_mib"]) / max(1, large - small)  # MiB per row
        at_r4b = b["peak_mib"] - idle["peak_mib"] + growth * (R4B_ROWS - large)
        notes.append(f"{name}: {growth * 2**20:,.1f} bytes/row of growth from {small:,} to {large:,} rows; at R-4B's "
                     f"{R4B_ROWS:,} rows: about {at_r4b:,.0f} MiB over idle, "
                     f"{R4B_ROWS * b['seconds'] / large / 60:,.0f} min of reading at this rate")
    report.emit(text + "\n" + "\n".join(f"- {n}" for n in notes) + "\n", args.markdown,
                libraries=("torch", "transformers"))


if __name__ == "__main__":
    main()
