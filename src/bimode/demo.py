"""`bimode demo`: the embedded default end to end.

So far: build the synthetic world and the tiny model, teach it both response formats with a short bi-mode
SFT (every question in both modes), then show samples in each mode and accuracy per difficulty level, the
premise of the recipe (thinking pays on hard levels only). Each stage writes into the run directory and is
skipped when its output is already there, so a re-run resumes.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bimode.data import synthetic
from bimode.data.records import read_records, write_records
from bimode.modes import ThinkingMode


@dataclass
class DemoSize:
    n_train: int
    n_eval: int
    sft_steps: int


FULL = DemoSize(n_train=4000, n_eval=520, sft_steps=900)
QUICK = DemoSize(n_train=600, n_eval=104, sft_steps=60)


def _stage(name: str, done: Path, out: Path) -> bool:
    """True when the stage must run; prints what is skipped."""
    if done.exists():
        print(f"[{name}] already done ({done.relative_to(out)}), skipping")
        return False
    print(f"[{name}] running")
    return True


def run_demo(out: Path, quick: bool = False, overwrite: bool = False, seed: int = 0) -> int:
    import torch

    from bimode.generation.simple import generate
    from bimode.models import load_model
    from bimode.models.tiny import build_tiny
    from bimode.train.simple import SimpleSFTConfig, train_sft

    size = QUICK if quick else FULL
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()

    data = out / "data"
    if _stage("world", data / "eval.jsonl", out):
        write_records((s.to_record() for s in synthetic.generate(size.n_train, seed, "train", progress=True)),
                      data / "train.jsonl", overwrite=True)
        write_records((s.to_record() for s in synthetic.generate(size.n_eval, seed, "eval", progress=True)),
                      data / "eval.jsonl", overwrite=True)
    if _stage("tiny model", out / "tiny" / "config.json", out):
        build_tiny(out / "tiny")
    if _stage("bi-mode warm-up SFT", out / "sft" / "config.json", out):
        model, processor = load_model(out / "tiny", dtype=torch.float32)
        train_sft(model, processor, read_records(data / "train.jsonl"),
                  cfg=SimpleSFTConfig(steps=size.sft_steps, seed=seed))
        model.save_pretrained(out / "sft")
        processor.save_pretrained(out / "sft")

    model, processor = load_model(out / "sft", dtype=torch.float32)
    evals = read_records(data / "eval.jsonl")
    results = {mode: generate(model, processor, evals, mode=mode, max_new_tokens=48)
               for mode in (ThinkingMode.THINK, ThinkingMode.NO_THINK, ThinkingMode.AUTO)}
    print("\nSamples (gold answer, then each mode's response):")
    shown = set()
    for i, record in enumerate(evals):
        if record.family in shown:
            continue
        shown.add(record.family)
        print(f"\n--- {record.family} level {record.level}: {record.question!r}  gold={record.answer}")
        for mode, gens in results.items():
            print(f"  {mode.value:>8}: {gens[i].response!r}")
    print("\nAccuracy by level (exact match of the answer after </think>):")
    print(_accuracy_table(evals, results))
    print(f"\ndone in {time.time() - start:.0f} s; model in {out / 'sft'}")
    return 0


def _accuracy_table(records, results) -> str:
    by_level = defaultdict(lambda: defaultdict(list))
    thought = defaultdict(list)
    for mode, gens in results.items():
        for record, gen in zip(records, gens):
            by_level[record.level][mode].append(gen.parsed.answer == record.answer)
            if mode is ThinkingMode.AUTO:
                thought[record.level].append(gen.parsed.mode == "think")
    lines = ["| level | n | think | no_think | auto | auto thinks |", "|---|---|---|---|---|---|"]
    for level in sorted(by_level):
        row = by_level[level]
        acc = {m: sum(v) / len(v) for m, v in row.items()}
        lines.append(f"| {level} | {len(row[ThinkingMode.THINK])} | {acc[ThinkingMode.THINK]:.2f} | "
                     f"{acc[ThinkingMode.NO_THINK]:.2f} | {acc[ThinkingMode.AUTO]:.2f} | "
                     f"{sum(thought[level]) / len(thought[level]):.0%} |")
    return "\n".join(lines)
