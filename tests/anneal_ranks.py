"""Run under `accelerate launch`: anneal a few steps and write which rows each rank trained on."""

import json
import sys

from trl import TrlParser

from bimode.train.anneal import AnnealConfig, build_trainer
from bimode.train.checkpoint import end_processes

(cfg,) = TrlParser(AnnealConfig).parse_args_and_config(args=sys.argv[1:])
trainer = build_trainer(cfg)
seen = []
collate = trainer.data_collator


def spy(rows):
    seen.extend(r["row"] for r in rows)
    return collate(rows)


trainer.data_collator = spy
trainer.train()
rank = trainer.accelerator.process_index
with open(f"{cfg.output_dir}/rows-{rank}.json", "w") as fh:
    json.dump(seen, fh)
trainer.accelerator.wait_for_everyone()
trainer.save_model(f"{cfg.output_dir}/final")
if trainer.accelerator.is_main_process:
    trainer.processing_class.save_pretrained(f"{cfg.output_dir}/final")
end_processes(trainer)
