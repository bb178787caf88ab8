"""Why one annealing test took 22 s on one 2-core machine and 418 s on another: bf16 autocast on a CPU.

TRL's configs resolve an unset `bf16` to True. On a CPU that is bf16 autocast: fast where the CPU has
AVX-512 BF16 (or AMX), emulated elsewhere. This times the same annealing steps on the tiny model in fp32 and
in bf16, with the CPU's full instruction set and with oneDNN limited to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`, how
a CPU without bf16 instructions runs), each in a fresh process, and prints the ratios to fp32 on the full
instruction set.

    .venv/bin/python -m bench.cpu_precision [--steps 20] [--batch 32] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench import report

CHILD = r"""
import json, sys, time, tempfile
from pathlib import Path
import torch
from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.models.tiny import build_tiny
from bimode.train.anneal import AnnealConfig, build_trainer

steps, batch, bf16 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
tmp = Path(tempfile.mkdtemp())
model = build_tiny(tmp / "tiny")
train = write_records([s.to_record() for s in synthetic.generate(800, seed=5, families=["count", "shell"],
                                                                  max_level=2)], tmp / "train.jsonl")
cfg = AnnealConfig(model_path=str(model), train_files=[str(train)], output_dir=str(tmp / "out"), max_steps=steps,
                   per_device_train_batch_size=batch, learning_rate=3e-3, report_to=[], save_strategy="no",
                   use_cpu=True, bf16=bf16, gradient_checkpointing=False, target_modes="think",
                   dataloader_num_workers=0, disable_tqdm=True)
trainer = build_trainer(cfg)
start = time.perf_counter()
trainer.train()
print(json.dumps({"seconds": time.perf_counter() - start, "loss": trainer.state.log_history[-1]["train_loss"]}))
"""


def run(steps: int, batch: int, bf16: bool, isa: str | None) -> dict:
    env = dict(os.environ)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(batch), "1" if bf16 else "0"],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    report.add_markdown_flag(parser)
    args = parser.parse_args()
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    rows = []
    for isa in (None, "AVX2"):
        for bf16 in (False, True):
            rows.append((isa or "full", "bf16" if bf16 else "fp32", run(args.steps, args.batch, bf16, isa)))
    base = rows[0][2]["seconds"]
    cells = [[isa, precision, f"{r['seconds']:.1f}", f"{r['seconds'] / base:.2f}x", f"{r['loss']:.4f}"]
             for isa, precision, r in rows]
    report.emit(f"CPU: avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}, amx_bf16 "
                f"{'yes' if 'amx_bf16' in flags else 'no'}; {args.steps} annealing steps of {args.batch} on the tiny "
                f"model, each setting in a fresh process\n\n"
                + report.table(["instruction set", "precision", "seconds", "vs fp32 (full)", "final train loss"],
                               cells),
                args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
