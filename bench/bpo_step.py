"""One BPO training step against TRL's stock GRPOTrainer step, same model, prompts and sampling, one process.

Three trainers on the same annealed tiny model and the same records (batch: 8 prompts x 8 rollouts):
  stock    TRL's GRPOTrainer as shipped: auto-mode prompts, rollouts through `model.generate`
  ours     BPOTrainer with `rollout: auto`: the same rollouts through the shared-prefix engine
  bpo      BPOTrainer with `rollout: bimode`: 4 forced-thinking + 4 forced-non-thinking rollouts
`stock` and `ours` sample the same distribution, so their completion lengths match in expectation; the
measured mean lengths are printed next to each time. Each trainer runs `--steps` steps after one warm-up
step, in rounds that alternate the trainers; the ratio is of the median step times.

    .venv/bin/python bench/bpo_step.py --model runs/bpo_mini/annealed/final --records runs/bpo_mini/train.jsonl
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
        lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])
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
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").exists():
        sys.exit(f"{args.model}: no model there; run scripts/bpo_miniature.py first (it saves the annealed model)")
    torch.manual_seed(0)
    # stock TRL cannot mix image and text-only prompts in one batch: image records only, for all three
    records = [r for r in read_records(args.records) if r.images][:512]
    extra = {"gradient_checkpointing": args.gradient_checkpointing == "on", "temperature": args.temperature}
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
    base = statistics.median(times["stock"])
    print(f"{args.rounds} rounds x {args.steps} steps, 8 prompts x 8 rollouts, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, gradient checkpointing {args.gradient_checkpointing}, temperature {args.temperature}")
    print("| trainer | median step (s) | ratio to stock | mean completion length |\n|---|---|---|---|")
    for name in trainers:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.3f} | {median / base:.2f}x | {statistics.mean(lengths[name]):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
