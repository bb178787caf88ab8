"""R-4B's whole training pipeline in miniature, from separately built parts, on the embedded world.

    .venv/bin/python scripts/r4b_pipeline.py --out runs/pipeline [--steps 300] [--bpo-steps 100]

1. parts: a random SigLIP encoder and a random Qwen3 language model at the tiny model's sizes, saved apart
   (`bimode.models.tiny.build_tiny_parts`), then `bimode compose` -> a LLaVA checkpoint with a fresh projector;
2. the three earlier stages with the shipped recipes (r4b_stage1_projector, r4b_stage2_alignment,
   r4b_stage3_joint: their trainable sets, loss masking and packing) on the world's training records with
   direct answers (stage 1 and 2's caption / alignment data has no counterpart here);
3. bi-mode annealing (tiny_anneal) on every record in its ground-truth mode (thinking where the world says the
   sample needs it, as scripts/anneal_table3.py's "mixed");
4. BPO (tiny_bpo).
The recipes' learning rates are for a 4B model; at this size every stage runs at tiny_anneal's 3e-3 (their
ratios kept: stage 3's vision and projector at a tenth of the LLM's). Held-out accuracy in each mode after each
stage goes to results.json and a table.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.demo import evaluate_tiny as evaluate
from bimode.demo import needs_reasoning, train_to_final
from bimode.models.compose import compose
from bimode.models.tiny import build_tiny_parts
from bimode.recipes import load_recipe
from bimode.train.anneal import AnnealConfig
from bimode.train.bpo.trainer import BPOConfig

LR = 3e-3  # tiny_anneal's
STAGES = {  # recipe -> learning rates at this size (the recipes' ratios)
    "r4b_stage1_projector": dict(learning_rate=LR, projector_lr=LR),
    "r4b_stage2_alignment": dict(learning_rate=LR, projector_lr=LR, vision_lr=LR),
    "r4b_stage3_joint": dict(learning_rate=LR, llm_lr=LR, vision_lr=LR / 10, projector_lr=LR / 10),
}


def stage(recipe: str, start: Path, data: Path, out: Path, steps: int, seed: int, **fields) -> Path:
    common = dict(model_path=str(start), train_files=[str(data)], output_dir=str(out), max_steps=steps, seed=seed,
                  report_to=[], save_strategy="no", logging_steps=50, use_cpu=not torch.cuda.is_available(),
                  bf16=False, gradient_checkpointing=False, dataloader_num_workers=0)
    if recipe == "tiny_bpo":
        return train_to_final(load_recipe(BPOConfig, recipe, **common, **fields), out)
    batch = dict(per_device_train_batch_size=32, gradient_accumulation_steps=1, max_length=1024)
    if recipe == "r4b_stage3_joint":  # packs of 1,024 tokens hold about 10 rows here
        batch.update(per_device_train_batch_size=3)
    return train_to_final(load_recipe(AnnealConfig, recipe, **{**common, **batch, **fields}), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/pipeline")
    parser.add_argument("--steps", type=int, default=300, help="steps of each stage and of annealing")
    parser.add_argument("--bpo-steps", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = [s.to_record() for s in synthetic.generate(args.n_train, args.seed, "train")]
    direct = write_records([replace(r, mode="no_think") for r in train], out / "direct.jsonl", overwrite=True)
    mixed = write_records([replace(r, mode="think" if needs_reasoning(r) else "no_think") for r in train],
                          out / "mixed.jsonl", overwrite=True)
    bench = write_records([s.to_record() for s in synthetic.generate(args.n_eval, args.seed, "eval")],
                          out / "eval.jsonl", overwrite=True)
    vision, llm = build_tiny_parts(out / "parts")
    model = compose(vision, llm, out / "composed", seed=args.seed)
    results = {"composed": evaluate(model, bench, out / "eval_composed", ("think", "no_think"))}
    for recipe, lrs in STAGES.items():
        model = stage(recipe, model, direct, out / recipe, args.steps, args.seed, **lrs)
        results[recipe] = evaluate(model, bench, out / f"eval_{recipe}", ("think", "no_think"))
    model = stage("tiny_anneal", model, mixed, out / "anneal", args.steps, args.seed, target_modes="labelled")
    results["tiny_anneal"] = evaluate(model, bench, out / "eval_anneal", ("auto", "think", "no_think"))
    model = stage("tiny_bpo", model, mixed, out / "bpo", args.bpo_steps, args.seed, probe_files=[str(bench)])
    results["tiny_bpo"] = evaluate(model, bench, out / "eval_bpo", ("auto", "think", "no_think"))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| after | auto acc | think acc | no_think acc | auto thinks |\n|---|---|---|---|---|")
    for name, m in results.items():
        modes = m["modes"]
        cell = lambda mode, key="accuracy": f"{100 * modes[mode][key]:.1f}" if mode in modes else "-"  # noqa: E731
        print(f"| {name} | {cell('auto')} | {cell('think')} | {cell('no_think')} | "
              f"{cell('auto', 'thinking_rate') + '%' if 'auto' in modes else '-'} |")


if __name__ == "__main__":
    main()
