"""Run under `accelerate launch`: one BPO step; each rank saves its weights and the forward paths it took."""

import json
import sys

import torch
from trl import TrlParser

from bimode.train.bpo.trainer import BPOConfig, build_trainer
from bimode.train.processes import end_processes
from tests.helpers.bpo_helpers import ForwardPaths

paths = ForwardPaths.listening()
(cfg,) = TrlParser(BPOConfig).parse_args_and_config(args=sys.argv[1:])
trainer = build_trainer(cfg)
trainer.train()
rank = trainer.accelerator.process_index
model = trainer.accelerator.unwrap_model(trainer.model)
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{cfg.output_dir}/weights-{rank}.pt")
with open(f"{cfg.output_dir}/rank-{rank}.json", "w") as fh:
    json.dump({"paths": sorted(paths.paths), "loss": trainer.state.log_history[-1]["train_loss"]}, fh)
end_processes(trainer)
