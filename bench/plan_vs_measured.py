"""`bimode plan`'s training figures against the peak memory of real steps on this CPU (issue 28).

Each case runs in a fresh process: imports, then the resident memory is read (the baseline), then the model is
loaded and trained for a few steps (annealing) or one BPO step; the peak resident memory (`ru_maxrss`) minus the
baseline is what the step needed. The plan for the same settings (fp32, one device, no sharding) counts
weights, gradients, Adam's moments, activations and, for BPO, the rollouts' key/value cache.

    .venv/bin/python -m bench.realistic_model --out runs/realistic
    .venv/bin/python -m bench.plan_vs_measured runs/realistic        # all cases; writes bench/plan_vs_measured.json
    PLAN_BENCH_ROWS_SCALE=2 .venv/bin/python -m bench.plan_vs_measured runs/realistic   # twice the rows: _x2.json
    .venv/bin/python -m bench.plan_vs_measured --table [--markdown PATH]   # bench/RESULTS.md's table from both
    .venv/bin/python -m bench.plan_vs_measured qwen3_vl   # the Qwen3-VL-shaped model: plan_vs_measured_qwen3_vl.json
    .venv/bin/python -m bench.plan_vs_measured --table qwen3_vl    # its table (with _x2 as above)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import report
from bench.realistic_model import MODEL_NAMES, resolve_model

CASES = [(stage, lora, ckpt) for stage in ("anneal", "bpo") for lora in (False, True) for ckpt in (False, True)]
# BPO: 2 prompts x 4 rollouts; PLAN_BENCH_ROWS_SCALE=2 doubles both (a second set of shapes, not the one the
# plan's terms were worked out on)
SCALE = int(os.environ.get("PLAN_BENCH_ROWS_SCALE", "1"))
ROWS = {"anneal": 4 * SCALE, "bpo": 8 * SCALE}
# two BPO steps: Adam allocates its moments at the first optimizer step, so only from the second step on does a
# forward and backward run beside them (the steady state a plan is for; one step measured below it)
STEPS = {"anneal": 3, "bpo": 2}


def results_file(scale: int, family: str = "") -> Path:
    """The LLaVA model's results (runs/realistic, or a directory) unnamed; a family named on the command line
    (`qwen3_vl`) in a file of its own."""
    tag = f"_{family}" if family and family != "llava" else ""
    return report.ROOT / "bench" / f"plan_vs_measured{tag}{'' if scale == 1 else f'_x{scale}'}.json"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def settings(stage: str, lora: bool, ckpt: bool, model: str, data: str, out: str) -> dict:
    common = dict(model_path=model, train_files=[data], output_dir=out, per_device_train_batch_size=ROWS[stage],
                  max_steps=STEPS[stage], report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                  gradient_checkpointing=ckpt, logging_steps=1000, disable_tqdm=True, learning_rate=1e-4)
    if stage == "bpo":
        return {**common, "num_generations": 4, "max_completion_length": 24, "probe_steps": 0, "beta": 0.0}
    return {**common, "target_modes": "both"}


def measure(stage: str, lora: bool, ckpt: bool, model: str) -> dict:
    from bimode.data import synthetic
    from bimode.data.records import write_records

    work = Path(tempfile.mkdtemp())
    data = work / "train.jsonl"
    write_records([s.to_record() for s in synthetic.generate(64, seed=2, families=["count", "shell"], max_level=3)],
                  str(data))
    if stage == "bpo":
        from bimode.train.bpo.trainer import build_trainer
    else:
        from bimode.train.anneal import build_trainer
    base = rss()
    cfg, model_args = configs(stage, lora, ckpt, model, str(data), str(work / "out"))
    trainer = build_trainer(cfg, model_args=model_args if lora else None)
    longest = 0
    if stage == "anneal":  # the plan counts every row at the longest length (padding's worst case)
        from bimode.train.tokenization import tokenize_example

        longest = max(len(tokenize_example(trainer.processing_class, r, mode).input_ids)
                      for r, mode in trainer.data_collator.pairs)
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - base, "longest": longest}


def configs(stage: str, lora: bool, ckpt: bool, model: str, data: str, out: str, **overrides):
    """The training command's config and TRL's ModelConfig for a case: what the run trains with and the plan reads."""
    from trl import ModelConfig

    if stage == "bpo":
        from bimode.train.bpo.trainer import BPOConfig as Config
    else:
        from bimode.train.anneal import AnnealConfig as Config
    model_args = ModelConfig(use_peft=True, lora_r=16, lora_alpha=32) if lora else ModelConfig()
    return Config(**{**settings(stage, lora, ckpt, model, data, out), **overrides}), model_args


def planned(stage: str, lora: bool, ckpt: bool, model: str, longest: int, prompt_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from bimode.plan.build import Launch, build_plans
    from bimode.plan.model_shape import read_shape

    cfg, model_args = configs(stage, lora, ckpt, model, "", tempfile.mkdtemp(),
                              **({"max_length": longest} if stage == "anneal" else {}))
    result, _ = build_plans(cfg, model_args, stage, read_shape(model), Launch(), 1000.0, prompt_tokens,
                            AutoTokenizer.from_pretrained(model))
    return {"planned": result.total, "rows": {r.what: r.bytes for r in result.rows}}


def prompt_length(model: str) -> int:
    """The longest BPO prompt of the bench's records, as the engine renders it."""
    from bimode.data import synthetic
    from bimode.generation.types import Prompt
    from transformers import AutoProcessor

    from bimode.models.loading import load_image_only_processor

    try:
        processor = AutoProcessor.from_pretrained(model)
    except ImportError:  # Qwen-VL's processor without torchvision: its image part, as bimode loads it
        processor = load_image_only_processor(model)
    prompts = [Prompt.from_record(s.to_record()) for s in synthetic.generate(64, seed=2, families=["count", "shell"],
                                                                             max_level=3)]
    texts = [processor.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    return max(len(processor(images=p.images, text=[t], return_tensors="pt")["input_ids"][0])
               for p, t in zip(prompts, texts))


def table(first: list[dict], twice: list[dict]) -> str:
    """bench/RESULTS.md's table: planned / measured - 1 per case, checkpointing off / on in one cell."""
    def cell(results: list[dict], stage: str, lora: bool) -> str:
        by_ckpt = {r["checkpointing"]: r for r in results if r["stage"] == stage and r["lora"] == lora}
        return " / ".join(f"{by_ckpt[c]['planned'] / by_ckpt[c]['measured'] - 1:+.0%}" for c in (False, True))

    rows = [[f"{'anneal' if stage == 'anneal' else 'BPO'}, {'LoRA r 16' if lora else 'full'}, checkpointing off / on",
             cell(first, stage, lora), cell(twice, stage, lora)]
            for stage in ("anneal", "bpo") for lora in (False, True)]

    def within(results: list[dict]) -> str:
        return f"{sum(abs(r['planned'] / r['measured'] - 1) <= 0.25 for r in results)} of {len(results)}"

    return (report.table(["case", "first shapes", "twice the rows"], rows)
            + f"\nWithin 25%: {within(first)} at the first shapes, {within(twice)} at twice the rows.\n")


def main() -> None:
    if sys.argv[1:2] == ["--table"]:  # from the two result files, without measuring
        markdown = sys.argv[sys.argv.index("--markdown") + 1] if "--markdown" in sys.argv else None
        family = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else ""
        first, twice = (json.loads(results_file(scale, family).read_text()) for scale in (1, 2))
        report.emit(f"From {results_file(1, family).name} and {results_file(2, family).name} as measured (the header "
                    "says when this table was made; the numbers are of the commit that last wrote those files).\n\n"
                    + table(first, twice), markdown)
        return
    model = family = sys.argv[1]
    if model in MODEL_NAMES:  # a family's model (bench/realistic_model.py)
        model = resolve_model(model)
    if len(sys.argv) > 2:  # one case, in this fresh process
        stage, lora, ckpt = sys.argv[2], sys.argv[3] == "lora", sys.argv[4] == "ckpt"
        print(json.dumps(measure(stage, lora, ckpt, model)))
        return
    measured = {}
    for case in CASES:  # every measurement first, each in a fresh process, before this process plans anything
        stage, lora, ckpt = case
        # glibc keeps freed heap memory for reuse, so a process's peak resident memory is its heap's high-water
        # mark, not the peak of live tensors; served by mmap, large blocks go back to the system when freed
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        run = subprocess.run([sys.executable, "-m", "bench.plan_vs_measured", model, stage, "lora" if lora else "full",
                              "ckpt" if ckpt else "nockpt"], capture_output=True, text=True, check=True, env=env)
        measured[case] = json.loads(run.stdout.strip().splitlines()[-1])
    prompt = prompt_length(model)
    results = []
    for (stage, lora, ckpt), m in measured.items():
        plan = planned(stage, lora, ckpt, model, m["longest"], prompt)
        results.append({"stage": stage, "lora": lora, "checkpointing": ckpt, **m, **plan})
        r = results[-1]
        print(f"{stage:6} {'lora' if lora else 'full':4} ckpt {'on ' if ckpt else 'off'}  measured "
              f"{r['measured'] / 2**20:7.0f} MiB  planned {r['planned'] / 2**20:7.0f} MiB  "
              f"({r['planned'] / r['measured'] - 1:+.0%})", flush=True)
    out = results_file(SCALE, family if family in MODEL_NAMES else "")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}; the table of both runs: .venv/bin/python -m bench.plan_vs_measured --table "
          f"{family if out.name != results_file(SCALE).name else ''}")


if __name__ == "__main__":
    main()
