"""Annealing throughput at realistic shapes: batches grouped by length against random batches (issue 17, item 4).

    .venv/bin/python -m bench.anneal_throughput runs/realistic --records 48 --batch 4 [--markdown PATH]

Both sides train the same model (bench/realistic_model.py) for one whole epoch of the same synthetic-world
records in both modes (thinking targets carry traces, non-thinking ones do not: lengths differ by the trace),
fp32, one after the other in this process: `train_sampling_strategy: random` (today's default) and
`group_by_length` (transformers' LengthGroupedSampler over bimode's estimated lengths). A whole epoch, so both
sides process the same rows (the length-grouped sampler puts the longest batches first: a few steps of it
would time longer rows than the random side's). Reported: real (non-pad) tokens per second, padded tokens per
second, the padding share, and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench import report
from bimode.recipes import load_recipe
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.train.anneal import AnnealConfig, build_trainer


class Counting:
    """Wraps the collator: counts real and computed (padded) tokens of the batches it builds; a packed batch
    (no attention mask, bench/packed_anneal.py) has no padding."""

    def __init__(self, collator):
        self.collator, self.real, self.padded = collator, 0, 0

    def __call__(self, rows):
        batch = self.collator(rows)
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.padded += batch["input_ids"].numel()
        return batch


def side(model: str, data: Path, out: Path, strategy: str, batch: int) -> dict:
    cfg = load_recipe(AnnealConfig, "tiny_anneal", model_path=model, train_files=[str(data)], output_dir=str(out),
                      target_modes="both", max_steps=-1, num_train_epochs=1, per_device_train_batch_size=batch,
                      report_to=[], save_strategy="no", use_cpu=True, logging_steps=10_000, disable_tqdm=True,
                      train_sampling_strategy=strategy)
    return timed_epoch(build_trainer(cfg))


def timed_epoch(trainer) -> dict:
    """Train (one epoch, as configured) with the batches' tokens counted: seconds, steps, token rates, padding."""
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"s": seconds, "steps": trainer.state.global_step, "real_tok_s": counter.real / seconds,
            "padded_tok_s": counter.padded / seconds, "padding": 1 - counter.real / counter.padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory (bench/realistic_model.py builds runs/realistic)")
    parser.add_argument("--records", type=int, default=48, help="records (each in both modes: twice the rows)")
    parser.add_argument("--batch", type=int, default=4)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    records = [s.to_record() for s in synthetic.generate(args.records, seed=2, families=["count", "shell", "tally"])]
    write_records(records, work / "train.jsonl")
    results = {s: side(args.model, work / "train.jsonl", work / s, s, args.batch)
               for s in ("random", "group_by_length")}
    labels = {"random": "random (default)", "group_by_length": "`train_sampling_strategy: group_by_length`"}
    rows = [[labels[name], r["steps"], f"{r['s']:.1f}", f"{r['real_tok_s']:.0f}", f"{r['padded_tok_s']:.0f}",
             f"{100 * r['padding']:.1f}%", f"{r['real_tok_s'] / results['random']['real_tok_s']:.2f}x"]
            for name, r in results.items()]
    report.emit(report.table(["batches", "steps", "s", "real tok/s", "padded tok/s", "padding", "ratio"], rows),
                args.markdown)


if __name__ == "__main__":
    main()
