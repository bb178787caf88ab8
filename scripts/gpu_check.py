"""Ready for the first GPU (issue 35, item 7): both realistic models through BPO and packed annealing, with the plan
against the measured peak, in one table.

On a GPU (`make gpu-check`; sized for one 80 GB card, under 8 minutes), for bench/realistic_model.py's LLaVA model
(runs/realistic) and its Qwen3-VL-shaped one (runs/realistic_qwen3_vl), both built when missing, in bf16 autocast:
  bpo     three BPO steps (bench/bpo_step_realistic.py's side `bpo_vllm`: one image question x 16 rollouts of 128
          tokens, rollouts on colocated vLLM, BPO's shared-prefix forward where the model takes it)
  anneal  three packed annealing steps (bench/packed_anneal.py's bi-mode rows, packs of 6,144 tokens), on
          flash-attention's variable-length path where flash_attn imports, else SDPA row by row
Each case runs in a process of its own (its peak its own, vLLM's memory gone with it) and reports seconds per step,
the attention or rollout engine and the training forward it took, `torch.cuda.max_memory_allocated`, and what
`bimode plan` estimates for the same settings (its build_plans, on the trainer's own config).

Without a GPU it says so and runs the smallest case on CPU, so CI keeps it working: the tiny Qwen3-VL model (the
family whose positions, images and deepstack features take the most code of their own; the LLaVA cases run the
same functions), one step of each case, vLLM only where it imports, in one child process; no memory is measured
there.

    .venv/bin/python scripts/gpu_check.py [--markdown PATH]
    .venv/bin/python scripts/gpu_check.py --cpu       # the CPU form, on a GPU machine too
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bench package and its helpers, as `python -m bench.*` finds them

from bench import report  # noqa: E402

GIB = 2 ** 30
# (model name for bench/realistic_model.resolve_model, label); the CPU form's tiny models of the same families
MODELS = {"gpu": [("llava", "LLaVA (SigLIP + Qwen3)"), ("qwen3_vl", "Qwen3-VL")],
          "cpu": [("tiny_qwen3_vl", "tiny Qwen3-VL")]}  # the family with the most paths of its own
# per form: BPO's group and completion, steps, annealing rows and pack length
SIZES = {"gpu": dict(group=16, completion=128, steps=3, rows=16, max_length=6144),
         "cpu": dict(group=4, completion=4, steps=1, rows=3, max_length=2048)}
VLLM_SHARE = 0.2  # vLLM's share of the GPU: its weights and the step's 16 x ~750 tokens of cache fit in far less
WITHIN = 0.25  # the plan's goal: within 25% of the measured peak
STAGES = ("bpo", "anneal")


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def gpu_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0


def plan_estimate(cfg, model_args, stage: str, model: str, prompt_tokens: int = 0) -> dict:
    """What `bimode plan` says for the trainer's own config: its total, and the vLLM share inside it."""
    from bimode.plan.build import Launch, build_plans
    from bimode.plan.model_shape import read_shape

    result, _ = build_plans(cfg, model_args, stage, read_shape(model), Launch(), gpu_gib(), prompt_tokens)
    vllm = sum(r.bytes for r in result.rows if r.what.startswith("vLLM"))
    return {"plan": result.total, "plan_vllm": vllm}


def bpo_case(model: str, form: str) -> dict:
    """Three BPO steps (one on CPU) through bench/bpo_step_realistic.py's driver."""
    import torch
    from trl import ModelConfig

    from bench import bpo_step_realistic as bench
    from bimode.generation.types import Prompt
    from tests.helpers.bpo_helpers import ForwardPaths

    sizes = SIZES[form]
    vllm = has("vllm")  # on a GPU without it (`pip install -e ".[vllm]"`): bimode's engine, and the table says so
    args = argparse.Namespace(side="bpo_vllm" if vllm else "bpo", model=model, queries=1, group=sizes["group"],
                              completion=sizes["completion"], steps=sizes["steps"] - 1, beta=0.0,
                              gradient_checkpointing="off", vllm_max_model_length=1024, bf16=form == "gpu",
                              vllm_gpu_memory_utilization=VLLM_SHARE if form == "gpu" else None)
    torch.manual_seed(0)
    paths = ForwardPaths.listening()
    trainer = bench.build(args.side, args, tempfile.mkdtemp(prefix="bimode_gpu_check_"))
    result = bench.timed_steps(trainer, args, paths)
    record = bench.bench_records(1)[0]
    processor = trainer.processing_class
    text = processor.apply_chat_template(Prompt.from_record(record).messages, add_generation_prompt=True,
                                         tokenize=False)
    prompt = len(processor(images=record.load_images(), text=[text], return_tensors="pt")["input_ids"][0])
    return {"steps": sizes["steps"], "s_per_step": result["median"]["step"],
            "path": ("colocated vLLM rollouts; " if vllm else "bimode's engine (vLLM not installed); ")
                    + "; ".join(result["paths"]),
            "peak": result["max_allocated"],
            **plan_estimate(trainer.args, ModelConfig(), "bpo", model, prompt)}


def anneal_case(model: str, form: str) -> dict:
    """Three packed annealing steps (one on CPU) of bench/packed_anneal.py's bi-mode rows."""
    import torch
    from transformers import AutoTokenizer
    from trl import ModelConfig

    from bench.anneal_throughput import Counting
    from bench.packed_anneal import bimode_rows, packs_rows, side_trainer
    from bimode.compat.transformers_api import attention_implementation
    from bimode.data.records import write_records

    sizes = SIZES[form]
    work = Path(tempfile.mkdtemp(prefix="bimode_gpu_check_"))
    # every row within a pack's length: bimode anneal refuses a longer one (a bad row) rather than truncate it
    longest = min(4000, sizes["max_length"] - 512)
    write_records(bimode_rows(sizes["rows"], AutoTokenizer.from_pretrained(model), longest=longest),
                  work / "train.jsonl")
    gpu = form == "gpu"
    model_args = ModelConfig(attn_implementation="flash_attention_2" if gpu and has("flash_attn") else None)
    trainer = side_trainer(model, work / "train.jsonl", work / "out", "packed", 1, sizes["max_length"],
                           model_args=model_args, max_steps=sizes["steps"], use_cpu=not gpu, bf16=gpu)
    counter = Counting(trainer.data_collator)
    trainer.data_collator = counter
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    attention = attention_implementation(trainer.model.config.get_text_config())
    return {"steps": trainer.state.global_step, "s_per_step": seconds / max(trainer.state.global_step, 1),
            "path": f"{'packs' if packs_rows(trainer) else 'PADDED (this model cannot pack yet)'}, {attention}, "
                    f"{counter.real:,} tokens",
            "peak": torch.cuda.max_memory_allocated() if gpu else 0,
            **plan_estimate(trainer.args, model_args, "anneal", model)}


def run_cases(cases: list[tuple[str, str]], form: str) -> list[dict]:
    """(model, stage) cases in one fresh process, in order; returns what each reported."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, __file__, "--cases", json.dumps(cases), "--form", form],
                          capture_output=True, text=True, check=False, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{cases} failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def row(label: str, stage: str, r: dict, form: str) -> list[str]:
    gpu = form == "gpu" and r["peak"] > 0
    off = r["plan"] / r["peak"] - 1 if gpu else None
    within = ("yes" if abs(off) <= WITHIN else "**no**") if gpu else "-"
    return [label, stage, str(r["steps"]), f"{r['s_per_step']:.2f}", r["path"], size(r["peak"]) if gpu else "-",
            f"{size(r['plan'])} (vLLM {size(r['plan_vllm'])})", f"{off:+.0%}" if gpu else "no GPU", within]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU form even where a GPU is found")
    parser.add_argument("--cases", help=argparse.SUPPRESS)  # a child: JSON [[model dir, stage], ...]
    parser.add_argument("--form", choices=("gpu", "cpu"), help=argparse.SUPPRESS)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    if args.cases:
        print(json.dumps([(bpo_case if stage == "bpo" else anneal_case)(model, args.form)
                          for model, stage in json.loads(args.cases)]))
        return 0
    import torch

    from bench.realistic_model import resolve_model

    form = "gpu" if torch.cuda.is_available() and not args.cpu else "cpu"
    if form == "cpu":
        print("No GPU" + (" used (--cpu)" if torch.cuda.is_available() else " found") + ": the smallest case on CPU "
              "(tiny models, one step each" + (", vLLM rollouts" if has("vllm") else ", no vLLM: not installed")
              + "; no memory measured).", file=sys.stderr, flush=True)
    scratch = tempfile.mkdtemp(prefix="bimode_gpu_check_models_")
    start = time.perf_counter()
    cases = [(resolve_model(name, scratch), stage, label) for name, label in MODELS[form] for stage in STAGES]
    # on a GPU each case in a process of its own (its peak its own, vLLM's memory gone with it); on CPU one
    # process runs them all, as nothing is measured there
    groups = [[case] for case in cases] if form == "gpu" else [cases]
    rows = []
    for group in groups:
        for (_, stage, label), result in zip(group, run_cases([(m, s) for m, s, _ in group], form)):
            rows.append(row(label, stage, result, form))
            print(f"{label}, {stage}: done ({time.perf_counter() - start:.0f} s so far)", file=sys.stderr, flush=True)
    sizes = SIZES[form]
    note = (f"{'GPU ' + torch.cuda.get_device_name() if form == 'gpu' else 'CPU form (no GPU)'}: "
            f"BPO {sizes['steps']} step(s) of 1 image question x {sizes['group']} rollouts, "
            f"{sizes['completion']}-token completions; packed annealing {sizes['steps']} step(s), packs of {sizes['max_length']:,} tokens; "
            f"{'bf16 autocast, each case in its own process' if form == 'gpu' else 'fp32, the cases in one process'}; "
            f"{time.perf_counter() - start:.0f} s in all.\n\n")
    columns = ["model", "case", "steps", "s / step", "path taken", "measured peak (max_memory_allocated)",
               "plan (of it vLLM's share)", "plan against measured", f"within {WITHIN:.0%}"]
    libraries = ("torch", "transformers", "trl", "vllm", "vllm-cpu", "flash_attn")
    report.emit(note + report.table(columns, rows), args.markdown, libraries=libraries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
