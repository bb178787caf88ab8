"""One BPO training step against TRL's stock GRPOTrainer step, same model, prompts and sampling, one process.

Three trainers on the same annealed tiny model and the same records (batch: 8 prompts x 8 rollouts):
  stock    TRL's GRPOTrainer as shipped: auto-mode prompts, rollouts through `model.generate`
  ours     BPOTrainer with `rollout: auto`: the same rollouts through the shared-prefix engine
  bpo      BPOTrainer with `rollout: bimode`: 4 forced-thinking + 4 forced-non-thinking rollouts
`stock` and `ours` sample the same distribution, so their completion lengths match in expectation; the
measured mean lengths are printed next to each time. Each trainer runs `--steps` steps after one warm-up
step, in rounds that alternate the trainers; the ratio is of the median step times.

    .venv/bin/python -m bench.bpo_step --model runs/bpo_mini/annealed/final --records runs/bpo_mini/train.jsonl \\
        --settings 0.001,off 1.0,off 0.001,on [--markdown PATH]    # the three rows of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
from trl import GRPOConfig, GRPOTrainer

from bench import report
from bimode.compat.trl_api import logged_metric
from bimode.data.records import read_records
from bimode.models import load_model
from bimode.train.bpo.trainer import BPOConfig, BPOTrainer
from bimode.train.bpo.rewards import build_rewards

COMMON = dict(num_generations=8, per_device_train_batch_size=64, max_completion_length=40, learning_rate=1e-4,
              report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
              seed=0, chat_template_kwargs={"thinking_mode": "auto"})


def stock_trainer(model_dir, records, out, **extra):
    model, processor = load_model(model_dir, dtype=torch.float32)
    rows = [{"prompt": r.messages(), "images": r.load_images(), "answer": r.answer, "answer_type": r.answer_type,
             "choices": r.choices} for r in records]
    dataset = datasets.Dataset.from_list(rows)
    args = GRPOConfig(output_dir=str(out), max_steps=10_000, **COMMON, **extra)
    return GRPOTrainer(model=model, reward_funcs=build_rewards(["accuracy"], processor.tokenizer), args=args,
                       train_dataset=dataset, processing_class=processor)


def bimode_trainer(model_dir, records, out, rollout, **extra):
    model, processor = load_model(model_dir, dtype=torch.float32)
    args = BPOConfig(output_dir=str(out), max_steps=10_000, rollout=rollout, probe_steps=0, **COMMON, **extra)
    return BPOTrainer(model=model, args=args, records=records, processor=processor)


def timed_steps(trainer, steps: int) -> tuple[list[float], float]:
    """Step times and mean completion length of `steps` optimizer steps (generation + loss + update)."""
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    iterator = iter(trainer.get_train_dataloader())
    times, lengths = [], []
    for _ in range(steps):
        batch = next(iterator)
        start = time.perf_counter()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(trainer.model, batch, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        lengths.append(logged_metric(trainer, "completions/mean_length")[-1])
        assert torch.isfinite(loss)
    return times, statistics.mean(lengths)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/bpo_mini/annealed/final")
    parser.add_argument("--records", default="runs/bpo_mini/train.jsonl")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bimode_bench_bpo")
    # TRL turns gradient checkpointing on by default; the tiny recipes turn it off (it only recomputes there)
    # near-greedy by default: stock and `ours` then produce the same completions, so the same lengths are timed
    parser.add_argument("--temperature", type=float, default=1e-3)
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--settings", nargs="+", metavar="TEMPERATURE,CHECKPOINTING", default=None,
                        help="several settings one after the other, a table row each (e.g. 0.001,off 1.0,off "
                             "0.001,on); instead of --temperature and --gradient-checkpointing")
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model there; run scripts/bpo_miniature.py first (it saves the annealed model)")
    settings = [parse_setting(s) for s in args.settings] if args.settings else \
        [(args.temperature, args.gradient_checkpointing)]
    # stock TRL cannot mix image and text-only prompts in one batch: image records only, for all three
    records = [r for r in read_records(args.records) if r.images][:512]
    rows = [measure(args, records, temperature, checkpointing) for temperature, checkpointing in settings]
    report.emit(f"{args.rounds} rounds x {args.steps} steps per trainer after one warm-up step, trainers alternating; "
                f"8 prompts x 8 rollouts; median step times\n\n"
                + report.table(["setting", "stock (s)", "`rollout: auto` (s), ratio", "`rollout: bimode` (s), ratio",
                                "mean lengths stock / auto / bimode"], rows), args.markdown)
    return 0


def parse_setting(text: str) -> tuple[float, str]:
    temperature, _, checkpointing = text.partition(",")
    if checkpointing not in ("on", "off"):
        sys.exit(f"--settings {text!r}: give TEMPERATURE,on or TEMPERATURE,off")
    return float(temperature), checkpointing


def measure(args, records, temperature: float, checkpointing: str) -> list[str]:
    """One table row: the three trainers at this temperature and checkpointing setting."""
    torch.manual_seed(0)
    extra = {"gradient_checkpointing": checkpointing == "on", "temperature": temperature}
    trainers = {"stock": stock_trainer(args.model, records, f"{args.out}/stock", **extra),
                "ours": bimode_trainer(args.model, records, f"{args.out}/ours", "auto", **extra),
                "bpo": bimode_trainer(args.model, records, f"{args.out}/bpo", "bimode", **extra)}
    for trainer in trainers.values():
        timed_steps(trainer, 1)  # warm-up
    times = {name: [] for name in trainers}
    lengths = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            t, length = timed_steps(trainer, args.steps)
            times[name] += t
            lengths[name].append(length)
    median = {name: statistics.median(t) for name, t in times.items()}
    return [f"temperature {temperature:g}, gradient checkpointing {checkpointing}", f"{median['stock']:.3f}",
            f"{median['ours']:.3f}, {median['ours'] / median['stock']:.2f}x",
            f"{median['bpo']:.3f}, {median['bpo'] / median['stock']:.2f}x",
            " / ".join(f"{statistics.mean(lengths[name]):.1f}" for name in ("stock", "ours", "bpo"))]


if __name__ == "__main__":
    raise SystemExit(main())
