"""Shared-prefix bi-mode groups versus repeated prompts, on the tiny model with image prompts.

Both sides run in this one process on the same model, prompts, group shapes and sampling settings:
  shared    engine.generate with one Prompt per question and 2g sample modes (one prefill per question)
  repeated  engine.generate with each sample as its own Prompt (the prompt prefilled 2g times, as TRL's
            transformers path does), same decode loop
  hf        transformers' model.generate on the repeated prompts (TRL's actual transformers path)
Reported: completion tokens per second, prefill tokens computed, and ratios against each baseline.

    .venv/bin/python bench/shared_prefix.py [--questions 8] [--max-new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bimode.data import synthetic
from bimode.generation.engine import TransformersEngine
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from bimode.models.tiny import build_tiny
from bimode.modes import ThinkingMode


def run(fn, repeats):
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return tokens, best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="model dir (default: a freshly built tiny model)")
    args = parser.parse_args()
    path = args.model or build_tiny(tempfile.mkdtemp() + "/tiny")
    model, processor = load_model(path, dtype=torch.float32)
    engine = TransformersEngine(model, processor, max_batch_rows=1024)
    records = [s.to_record() for s in synthetic.generate(args.questions, seed=0, split="eval",
                                                         families=["shell"], levels=[6])]
    prompt_len = len(processor(images=records[0].load_images(), text=[engine.render(Prompt.from_record(records[0]))],
                               return_tensors="pt")["input_ids"][0])
    # Fixed-length continuations so both sides generate the same number of tokens.
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    engine.eos_ids = set()  # never stop early: equal work on both sides
    print(f"tiny model, {args.questions} image questions, prompt {prompt_len} tokens, "
          f"{args.max_new_tokens} new tokens per sample, best of {args.repeats}, {torch.get_num_threads()} threads")
    print("| group (g think + g no_think) | side | s | completion tok/s | prefill tokens | speed-up |")
    print("|---|---|---|---|---|---|")
    for n in (8, 16):
        modes = [ThinkingMode.THINK] * (n // 2) + [ThinkingMode.NO_THINK] * (n // 2)
        shared_prompts = [Prompt.from_record(r, modes) for r in records]
        repeated_prompts = [Prompt.from_record(r, [m]) for r in records for m in modes]

        def shared():
            return sum(c.num_tokens for g in engine.generate(shared_prompts, params) for c in g)

        def repeated():
            return sum(c.num_tokens for g in engine.generate(repeated_prompts, params) for c in g)

        def hf():
            total = 0
            for mode in (ThinkingMode.THINK, ThinkingMode.NO_THINK):
                prompts = [Prompt.from_record(r, [mode]) for r in records for _ in range(n // 2)]
                inputs = engine._encode([engine.render(p, mode) for p in prompts], [i for p in prompts for i in p.images])
                torch.manual_seed(0)
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                     do_sample=True, temperature=1.0, top_p=None, top_k=None,
                                     pad_token_id=engine.pad_id)
                total += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
            return total

        rows = {}
        for name, fn, prefill in (("shared", shared, args.questions * prompt_len),
                                  ("repeated", repeated, args.questions * n * prompt_len),
                                  ("hf generate", hf, args.questions * n * prompt_len)):
            tokens, seconds = run(fn, args.repeats)
            rows[name] = (tokens, seconds, prefill)
        base = rows["shared"][1]
        for name, (tokens, seconds, prefill) in rows.items():
            ratio = "1.00x" if name == "shared" else f"shared is {seconds / base:.2f}x faster"
            print(f"| {n // 2}+{n // 2} | {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {prefill:,} | {ratio} |")


if __name__ == "__main__":
    main()
