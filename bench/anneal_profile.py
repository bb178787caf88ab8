"""Where an annealing step's time goes at real shapes: cProfile of a few `bimode anneal` steps (issue 17).

    .venv/bin/python -m bench.anneal_profile runs/realistic 4 [--markdown PATH]    # model dir, steps

The model directory from bench/realistic_model.py; 64 synthetic-world records in both modes, batch 4, fp32 on CPU.
Prints the 25 most expensive calls by cumulative time (to stderr), then the table of bench/RESULTS.md: the step's
parts (the forward with its loss, backward, optimizer step and gradient clipping, the collator building the batch) as
cProfile's cumulative times of those functions.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import pstats
import sys
import tempfile
import time
from pathlib import Path

from accelerate.optimizer import AcceleratedOptimizer

from bench import report
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.train.anneal import AnnealConfig, build_trainer


def code_key(function) -> tuple[str, int, str]:
    """The key pstats files a function under (decorators unwrapped: the function that does the work)."""
    code = inspect.unwrap(function).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def cumulative(stats: pstats.Stats, functions: list) -> float:
    """Seconds spent in these functions, callees included (none of them calls another)."""
    return sum(stats.stats[key][3] for key in map(code_key, functions) if key in stats.stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model directory (bench/realistic_model.py builds runs/realistic)")
    parser.add_argument("steps", type=int)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    data, out, profile = work / "train.jsonl", work / "out", work / "profile.out"
    records = [s.to_record() for s in synthetic.generate(64, seed=2, families=["count", "shell"], max_level=3)]
    write_records(records, str(data))
    cfg = AnnealConfig(model_path=args.model, train_files=[str(data)], output_dir=str(out), max_steps=args.steps,
                       per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                       gradient_checkpointing=False, target_modes="both", logging_steps=1000, disable_tqdm=True)
    trainer = build_trainer(cfg)
    start = time.time()
    cProfile.runctx("trainer.train()", globals(), {"trainer": trainer}, str(profile))
    seconds = time.time() - start
    stats = pstats.Stats(str(profile), stream=sys.stderr)
    stats.sort_stats("cumulative").print_stats(25)
    # TRL's SFT loss runs the model and a chunked LM head inside compute_loss: the whole forward is that call
    parts = {"forward (`compute_loss`: the model and its loss)": [type(trainer).compute_loss],
             "backward": [type(trainer.accelerator).backward],
             "optimizer step and gradient clipping": [AcceleratedOptimizer.step,
                                                      type(trainer.accelerator).clip_grad_norm_],
             "the batch: tokenising, reading and processing images, padding (`BimodeCollator`)":
                 [type(trainer.data_collator).__call__]}
    rows = []
    for part, functions in parts.items():
        spent = cumulative(stats, functions)
        share = 100 * spent / seconds
        rows.append([part, f"{spent:.1f}", f"{share:.1f}%" if share < 1 else f"{share:.0f}%"])
    report.emit(f"{seconds:.1f} s for {args.steps} steps of batch 4 (under cProfile):\n\n"
                + report.table(["part of the step", "s", "share"], rows), args.markdown)


if __name__ == "__main__":
    main()
