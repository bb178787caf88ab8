"""BPO's p_think probe: how likely the policy is to think in auto mode, by level, while it trains.

Every `probe_steps` steps the trainer asks the probe records' auto-mode decision once (one forward pass, no
generation), logs `probe/p_think/level_L`, `probe/think_rate/level_L` and `probe/decision_mass/level_L`, and
the main process appends the same numbers with the step to OUTPUT_DIR/probe.jsonl. A run's first probe drops the
lines from its step on, which a run killed after its last checkpoint wrote: a resumed run logs each step once.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path

from bimode.compat.trl_api import log_metric
from bimode.data.records import Record
from bimode.generation.types import Prompt
from bimode.io import append_log, read_log, write_jsonl

log = logging.getLogger(__name__)


class PThinkProbe:
    """The probe set and when it last ran; `trainer` is the BPOTrainer that holds it (its step, engine, logs)."""

    def __init__(self, records: list[Record]):
        self.records = records
        self._prompts: list[Prompt] | None = None
        self._last_step = -1
        self._logged = False  # whether this process has written probe.jsonl yet

    def maybe_run(self, trainer) -> None:
        """Probe, log and append to probe.jsonl when this step is due (once per step, however many batches)."""
        step, every = trainer.state.global_step, trainer.args.probe_steps
        if not self.records or not every or step % every or step == self._last_step:
            return
        self._last_step = step
        result = self.run(trainer)
        for key, value in result.items():
            log_metric(trainer, f"probe/{key}", value)
        if trainer.accelerator.is_main_process:
            path = Path(trainer.args.output_dir) / "probe.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not self._logged:  # steps from here on are (re)run by this process: a killed run's lines go
                write_jsonl(path, [row for row in read_log(path) if row.get("step", step) < step])
                self._logged = True
            append_log(path, [{"step": step, **result}])

    def run(self, trainer) -> dict[str, float]:
        """Per level: mean auto-mode p_think, the greedy thinking rate (p_think >= 0.5) and the decision mass
        (probability on any decision token after `<think>`); one forward pass, no generation."""
        if self._prompts is None:  # fixed set: decode its images once
            self._prompts = self._decoded_prompts()
        with trainer.generation_engine() as engine:
            stats = engine.decision_stats(self._prompts)
        by_level = defaultdict(list)
        for record, value in zip(self.records, stats):
            by_level["all" if record.level is None else record.level].append(value)
        out = {}
        for level in sorted(by_level, key=str):
            values = by_level[level]
            out[f"p_think/level_{level}"] = sum(p for p, _ in values) / len(values)
            out[f"think_rate/level_{level}"] = sum(p >= 0.5 for p, _ in values) / len(values)
            # below 1, the decision's probability is leaking to other tokens (see SamplingParams.constrain_decision)
            out[f"decision_mass/level_{level}"] = sum(m for _, m in values) / len(values)
        return out


    def _decoded_prompts(self) -> list[Prompt]:
        """The probe's prompts; a record whose pixels fail to decode is left out of the probe (training names it in
        rejects.jsonl when a batch draws it)."""
        kept = []
        for record in self.records:
            try:
                kept.append((record, Prompt.from_record(record)))
            except ValueError as exc:
                log.warning("p_think probe: record %s left out: %s", record.id, exc)
        self.records = [record for record, _ in kept]
        return [prompt for _, prompt in kept]


def pick_probe(records: list[Record], size: int, seed: int) -> list[Record]:
    """Up to `size` records, as many from each level as the levels allow."""
    by_level = defaultdict(list)
    for r in records:
        by_level[r.level].append(r)
    rng = random.Random(seed)
    for group in by_level.values():
        rng.shuffle(group)
    out, i = [], 0
    while len(out) < size and any(i < len(g) for g in by_level.values()):
        out += [g[i] for g in by_level.values() if i < len(g)][: size - len(out)]
        i += 1
    return out
