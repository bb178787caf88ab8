"""Run under `accelerate launch`: one BPO step; each rank writes its rollouts' modes and advantages."""

import json
import sys

from trl import TrlParser

from bimode.train.bpo.trainer import BPOConfig, build_trainer
from bimode.train.processes import end_processes

(cfg,) = TrlParser(BPOConfig).parse_args_and_config(args=sys.argv[1:])
trainer = build_trainer(cfg)
seen = []
score = trainer.generate_and_score  # what every training step's generation goes through


def spy(rows):
    output, rollouts = score(rows)
    (rewards,) = rollouts.rewards.values()
    seen.append({"rows": rows, "modes": [m.value for m in rollouts.modes], "rewards": rewards,
                 "advantages": output["advantages"].tolist()})
    return output, rollouts


trainer.generate_and_score = spy
trainer.train()
with open(f"{cfg.output_dir}/rank-{trainer.accelerator.process_index}.json", "w") as fh:
    json.dump(seen, fh)
end_processes(trainer)
