"""The engine's plain path (models with multi-axis rotary positions: Qwen-VL) batched per mode, against one
`model.generate` per sample (how the path worked before, and how a naive loop does it).

Both run in this one process on a tiny random Qwen2.5-VL (tests/helpers/hf_fixtures.py), the same image prompts and
bi-mode groups, greedy, with the same completion lengths (greedy: the same tokens, checked).

    .venv/bin/python -m bench.plain_path [--questions 8] [--g 2] [--max-new-tokens 24] [--repeats 3] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench import report
from bimode.data import synthetic
from bimode.generation.engine import TransformersEngine
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from tests.helpers.hf_fixtures import build_tiny_qwen25_vl


def one_at_a_time(model, processor, prompts, max_new_tokens):
    out = []
    for p in prompts:
        for mode in p.modes:
            text = processor.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False,
                                                 thinking_mode=mode.value)
            inputs = processor(images=p.images, text=[text], return_tensors="pt")
            seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            out.append(seq[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--g", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load_model(build_tiny_qwen25_vl(Path(tmp) / "qwen"), dtype=torch.float32)
    engine = TransformersEngine(model, processor, max_batch_rows=4 * args.questions * args.g)
    records = [s.to_record() for s in synthetic.generate(args.questions, seed=3, families=["shell"])]
    prompts = [Prompt.bimode_group(r, args.g) for r in records]
    for p in prompts:
        p.images = [image.resize((56, 56)) for image in p.images]  # 4 merged patches of 28 px each
    params = SamplingParams(max_new_tokens=args.max_new_tokens, constrain_decision=False)
    with torch.no_grad():
        engine.generate(prompts[:1], params)  # warm-up
        batched_s, batched = best_time(lambda: engine.generate(prompts, params), args.repeats)
        single_s, single = best_time(lambda: one_at_a_time(model, processor, prompts, args.max_new_tokens),
                                     args.repeats)
    eos = processor.tokenizer.eos_token_id
    single = [s[: s.index(eos)] if eos in s else s for s in single]
    same = [c.token_ids for group in batched for c in group] == single
    tokens = sum(len(s) for s in single)
    rows = [["one generate per sample", f"{single_s:.3f}", f"{tokens / single_s:.0f}", "1.00x"],
            ["engine, one batched generate per mode", f"{batched_s:.3f}", f"{tokens / batched_s:.0f}",
             f"{single_s / batched_s:.2f}x"]]
    report.emit(f"{args.questions} questions x {2 * args.g} rollouts, {tokens} completion tokens; same tokens: "
                f"{same}\n\n" + report.table(["path", f"best of {args.repeats} (s)", "tokens/s", "ratio"], rows),
                args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
