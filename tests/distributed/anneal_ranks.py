"""Run under `accelerate launch`: `bimode anneal` exactly as docs/annealing.md's command runs it (the CLI, a recipe and
flags), with each rank's training rows written to OUTPUT_DIR/rows-RANK.json by a spy on the collator."""

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

import bimode.train.anneal
from bimode.cli import main

build_trainer = bimode.train.anneal.build_trainer


def spied_build_trainer(cfg, **kwargs):
    trainer = build_trainer(cfg, **kwargs)
    seen, collate = [], trainer.data_collator

    def spy(rows):
        seen.extend(r["row"] for r in rows)
        return collate(rows)

    class WriteRows(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            rank = trainer.accelerator.process_index
            Path(cfg.output_dir, f"rows-{rank}.json").write_text(json.dumps(seen))

    trainer.data_collator = spy
    trainer.add_callback(WriteRows())
    return trainer


bimode.train.anneal.build_trainer = spied_build_trainer  # the command looks it up when it runs
sys.exit(main(["anneal", *sys.argv[1:]]))
