"""Annealing throughput at realistic shapes: batches grouped by length against random batches (issue 17, item 4).

    .venv/bin/python bench/anneal_throughput.py runs/realistic --steps 12 --batch 4

Both sides train the same model (bench/realistic_model.py) on the same synthetic-world records in both modes
(thinking targets carry traces, non-thinking ones do not: lengths differ by the trace), fp32, one after the
other in this process, after one untimed warm-up step each: `train_sampling_strategy: random` (today's
default) and `group_by_length` (transformers' LengthGroupedSampler over bimode's estimated lengths). Reported:
real (non-pad) tokens per second, padded tokens per second, the padding share, and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bimode.commands.parsing import load_recipe
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.train.anneal import AnnealConfig, build_trainer


class Counting:
    """Wraps the collator: counts real and padded tokens of the batches it builds."""

    def __init__(self, collator):
        self.collator, self.real, self.padded = collator, 0, 0

    def __call__(self, rows):
        batch = self.collator(rows)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        return batch


def side(model: str, data: Path, out: Path, strategy: str, steps: int, batch: int) -> dict:
    cfg = load_recipe(AnnealConfig, "tiny_anneal", model_path=model, train_files=[str(data)], output_dir=str(out),
                      target_modes="both", max_steps=steps + 1, per_device_train_batch_size=batch, report_to=[],
                      save_strategy="no", use_cpu=True, logging_steps=10_000, disable_tqdm=True,
                      train_sampling_strategy=strategy)
    trainer = build_trainer(cfg)
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    times = []

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    end = time.perf_counter()
    # the warm-up step's batch is counted too: scale the counts to the timed steps
    timed = end - times[1]
    share = steps / (steps + 1)
    return {"s": timed, "real_tok_s": counter.real * share / timed, "padded_tok_s": counter.padded * share / timed,
            "padding": 1 - counter.real / counter.padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory (bench/realistic_model.py builds runs/realistic)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    records = [s.to_record() for s in synthetic.generate(256, seed=2, families=["count", "shell", "tally"])]
    write_records(records, work / "train.jsonl")
    results = {s: side(args.model, work / "train.jsonl", work / s, s, args.steps, args.batch)
               for s in ("random", "group_by_length")}
    print("| batches | s | real tok/s | padded tok/s | padding | ratio (real tok/s) |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = r["real_tok_s"] / results["random"]["real_tok_s"]
        print(f"| {name} | {r['s']:.1f} | {r['real_tok_s']:.0f} | {r['padded_tok_s']:.0f} | {100 * r['padding']:.1f}% "
              f"| {ratio:.2f}x |")


if __name__ == "__main__":
    main()
