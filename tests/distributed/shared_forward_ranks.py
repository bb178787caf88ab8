"""Run under `accelerate launch`: one BPO step; each rank saves its weights before and after it and the forward paths
it took."""

import json
import sys

import torch
from trl import TrlParser

from bimode.train.bpo.trainer import BPOConfig, build_trainer
from bimode.train.processes import end_processes
from tests.helpers.bpo_helpers import ForwardPaths

paths = ForwardPaths.listening()
(cfg,) = TrlParser(BPOConfig).parse_args_and_config(args=sys.argv[1:])
torch.manual_seed(0)  # rows loading adds for think tags a checkpoint lacks: the same in the runs a test compares
trainer = build_trainer(cfg)
before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
trainer.train()
rank = trainer.accelerator.process_index
model = trainer.accelerator.unwrap_model(trainer.model)
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{cfg.output_dir}/weights-{rank}.pt")
torch.save(before, f"{cfg.output_dir}/before-{rank}.pt")
with open(f"{cfg.output_dir}/rank-{rank}.json", "w") as fh:
    json.dump({"paths": sorted(paths.paths), "loss": trainer.state.log_history[-1]["train_loss"]}, fh)
end_processes(trainer)
