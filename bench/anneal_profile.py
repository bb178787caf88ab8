"""Where an annealing step's time goes at real shapes: cProfile of a few `bimode anneal` steps (issue 17).

    .venv/bin/python bench/anneal_profile.py runs/realistic 4     # model dir (bench/realistic_model.py), steps

64 synthetic-world records in both modes, batch 4, fp32 on CPU; prints the wall time and the 25 most
expensive calls by cumulative time.
"""

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from bimode.data import synthetic
from bimode.data.records import write_records
from bimode.train.anneal import AnnealConfig, build_trainer

WORK = Path(tempfile.mkdtemp())
DATA, OUT, PROFILE = WORK / "train.jsonl", WORK / "out", WORK / "profile.out"
records = [s.to_record() for s in synthetic.generate(64, seed=2, families=["count", "shell"], max_level=3)]
write_records(records, str(DATA))
cfg = AnnealConfig(model_path=sys.argv[1], train_files=[str(DATA)], output_dir=str(OUT), max_steps=int(sys.argv[2]),
                   per_device_train_batch_size=4, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                   gradient_checkpointing=False, target_modes="both", logging_steps=1000, disable_tqdm=True)
trainer = build_trainer(cfg)
start = time.time()
cProfile.run("trainer.train()", str(PROFILE))
print("seconds", time.time() - start)
pstats.Stats(str(PROFILE)).sort_stats("cumulative").print_stats(25)
