"""Full fine-tuning versus LoRA, for annealing and for BPO, on the embedded default.

Annealing: the tiny model annealed on the "mixed" data of scripts/anneal_table3.py (each training sample in
its ground-truth mode) for the same number of steps, once training every weight and once with LoRA (adapters on
the language model, projector in full, mode-token rows; bimode's defaults under `use_peft`). BPO: from the
fully annealed model, the same BPO run (scripts/bpo_miniature.py's settings, `mode_token_loss: on`) with every
weight trained and with LoRA. Every model is evaluated greedily in auto, think and no_think mode on the
held-out eval split. Reported per run: trainable parameters, accuracy per mode, auto-mode thinking rate and
the mean training step time (wall clock of `trainer.train()` over its steps: measure on an otherwise idle
machine).

    .venv/bin/python scripts/lora_comparison.py --out runs/lora_comparison
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from trl import ModelConfig

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.demo import evaluate_tiny, needs_reasoning, save_final
from bimode.models.tiny import build_tiny
from bimode.recipes import load_recipe
from bimode.train.anneal import AnnealConfig
from bimode.train.anneal import build_trainer as build_anneal
from bimode.train.bpo.trainer import BPOConfig
from bimode.train.bpo.trainer import build_trainer as build_bpo

MODES = ("auto", "think", "no_think")
ADDED_BY_PEFT = (".lora_A.", ".lora_B.", ".modules_to_save.", ".trainable_tokens_delta.")


def peft_args(use_peft: bool, r: int) -> ModelConfig:
    return ModelConfig(use_peft=use_peft, lora_r=r, lora_alpha=2 * r, lora_dropout=0.0)


def train(trainer, out: Path) -> dict:
    """Train, save to out/final; trainable parameters and mean step time."""
    params = list(trainer.model.named_parameters())
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    # the model's own size: without adapters and PEFT's trained copies
    total = sum(p.numel() for n, p in params if not any(k in n for k in ADDED_BY_PEFT))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    save_final(trainer, out)
    info = {"trainable": trainable, "total": total, "steps": trainer.state.global_step,
            "step_s": seconds / max(trainer.state.global_step, 1)}
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def anneal(base: Path, files: list[Path], out: Path, steps: int, lr: float, seed: int, model_args) -> dict:
    cfg = load_recipe(AnnealConfig, "tiny_anneal", model_path=str(base), train_files=[str(f) for f in files],
                      output_dir=str(out), max_steps=steps, learning_rate=lr, vision_lr=lr, projector_lr=lr,
                      llm_lr=lr, report_to=[], save_strategy="no", logging_steps=50, seed=seed,
                      use_cpu=not torch.cuda.is_available())
    return train(build_anneal(cfg, model_args=model_args), out)


def bpo(start: Path, train_file: Path, probe: Path, out: Path, steps: int, prompts: int, lr: float, seed: int,
        model_args) -> dict:
    cfg = load_recipe(BPOConfig, "tiny_bpo", model_path=str(start), train_files=[str(train_file)],
                      probe_files=[str(probe)], output_dir=str(out), per_device_train_batch_size=8 * prompts,
                      max_steps=steps, learning_rate=lr, report_to=[], save_strategy="no", probe_steps=0, seed=seed,
                      use_cpu=not torch.cuda.is_available())
    return train(build_bpo(cfg, model_args=model_args), out)


def evaluate(model_dir: Path, bench: Path, out: Path) -> dict:
    # adapters merged for evaluation: the same outputs (tests/unit/test_lora.py), faster
    return evaluate_tiny(model_dir, bench, out, MODES, merge_adapter=True)["modes"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lora_comparison")
    parser.add_argument("--anneal-steps", type=int, default=600)
    parser.add_argument("--bpo-steps", type=int, default=200)
    parser.add_argument("--bpo-prompts", type=int, default=8, help="prompts per BPO step (8 rollouts each)")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=400)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--anneal-lr", type=float, default=3e-3, help="full annealing LR (docs/embedded_default.md)")
    parser.add_argument("--anneal-lora-lr", type=float, default=1e-2, help="LoRA annealing LR")
    parser.add_argument("--bpo-lr", type=float, default=1e-4, help="full BPO LR (configs/recipes/tiny_bpo.yaml)")
    parser.add_argument("--bpo-lora-lr", type=float, default=1e-3, help="LoRA BPO LR")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = [s.to_record() for s in synthetic.generate(args.n_train, args.seed, "train")]
    mixed = write_records([replace(r, mode="think" if needs_reasoning(r) else "no_think") for r in records],
                          out / "mixed.jsonl", overwrite=True)
    train_file = write_records(records, out / "train.jsonl", overwrite=True)
    bench = write_records([s.to_record() for s in synthetic.generate(args.n_eval, args.seed, "eval")],
                          out / "eval.jsonl", overwrite=True)
    base = out / "tiny" if (out / "tiny" / "config.json").exists() else build_tiny(out / "tiny")
    results = {}
    for name, lr, use_peft in (("anneal, full", args.anneal_lr, False), ("anneal, LoRA", args.anneal_lora_lr, True)):
        directory = out / name.replace(", ", "_").lower()
        results[name] = anneal(base, [mixed], directory, args.anneal_steps, lr, args.seed,
                               peft_args(use_peft, args.lora_r))
        results[name]["modes"] = evaluate(directory / "final", bench, directory / "eval")
    start = out / "anneal_full" / "final"  # both BPO runs start from the same full checkpoint
    for name, lr, use_peft in (("BPO, full", args.bpo_lr, False), ("BPO, LoRA", args.bpo_lora_lr, True)):
        directory = out / name.replace(", ", "_").lower()
        results[name] = bpo(start, train_file, bench, directory, args.bpo_steps, args.bpo_prompts, lr, args.seed,
                            peft_args(use_peft, args.lora_r))
        results[name]["modes"] = evaluate(directory / "final", bench, directory / "eval")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    print_table(results, args)


def print_table(results: dict, args) -> None:
    print(f"n_train={args.n_train}, eval n={args.n_eval}, anneal {args.anneal_steps} steps x 32, BPO "
          f"{args.bpo_steps} steps x {args.bpo_prompts} prompts x 8 rollouts, LoRA r={args.lora_r}, seed={args.seed}, "
          f"device={'cuda' if torch.cuda.is_available() else 'cpu'}\n")
    print("| run | trainable params | auto acc | think acc | no_think acc | auto thinks | step time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, m in results.items():
        a, t, n = (m["modes"][k] for k in MODES)
        share = 100 * m["trainable"] / m["total"]
        print(f"| {name} | {m['trainable']:,} ({share:.0f}%) | {100 * a['accuracy']:.1f} | {100 * t['accuracy']:.1f} "
              f"| {100 * n['accuracy']:.1f} | {100 * a['thinking_rate']:.0f}% | {m['step_s']:.3f} |")


if __name__ == "__main__":
    main()
