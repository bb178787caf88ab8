"""Run under `accelerate launch`: one BPO step; each rank writes its rollouts' modes and advantages."""

import json
import sys

from trl import TrlParser

from bimode.train.bpo import BPOConfig, build_trainer
from bimode.train.processes import end_processes

(cfg,) = TrlParser(BPOConfig).parse_args_and_config(args=sys.argv[1:])
trainer = build_trainer(cfg)
seen = []
score = trainer._generate_and_score_completions


def spy(inputs):
    output = score(inputs)
    seen.append({"rows": trainer._rows, "modes": [m.value for m in trainer._rollout_info["modes"]],
                 "rewards": trainer.guarded_rewards[0].last, "advantages": output["advantages"].tolist()})
    return output


trainer._generate_and_score_completions = spy
trainer.train()
with open(f"{cfg.output_dir}/rank-{trainer.accelerator.process_index}.json", "w") as fh:
    json.dump(seen, fh)
end_processes(trainer)
