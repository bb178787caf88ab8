"""Run under `accelerate launch`: one BPO step; each rank saves its weights and the forward paths it took."""

import json
import logging
import sys

import torch
from trl import TrlParser

from bimode.train.bpo.trainer import BPOConfig, build_trainer
from bimode.train.processes import end_processes
from tests.helpers.bpo_helpers import forward_path

class ForwardPaths(logging.Handler):
    """The forward paths BPO says it scores rollouts with (its log)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.paths: set[str] = set()

    def emit(self, record):
        if (path := forward_path(record.getMessage())) is not None:
            self.paths.add(path)


paths = ForwardPaths()
bpo_log = logging.getLogger("bimode.train.bpo.trainer")
bpo_log.addHandler(paths)
bpo_log.setLevel(logging.INFO)
(cfg,) = TrlParser(BPOConfig).parse_args_and_config(args=sys.argv[1:])
trainer = build_trainer(cfg)
trainer.train()
rank = trainer.accelerator.process_index
model = trainer.accelerator.unwrap_model(trainer.model)
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{cfg.output_dir}/weights-{rank}.pt")
with open(f"{cfg.output_dir}/rank-{rank}.json", "w") as fh:
    json.dump({"paths": sorted(paths.paths), "loss": trainer.state.log_history[-1]["train_loss"]}, fh)
end_processes(trainer)
