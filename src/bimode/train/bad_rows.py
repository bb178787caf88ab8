"""Rows that fail during training: pixels that do not decode past a header the check before step 1 passed.

Images are decoded only when a batch needs them (anneal's collator, BPO's generation step), both through
`RowImages`: a row whose images fail to decode is named in a reject and its place goes to the next row that decodes,
so a batch keeps its size and BPO's groups their rollouts (every process picks the same substitute, as it depends
on the row alone). The trainer (`BadRowsMixin`) counts the failed rows of every process, the first process adds
them to OUTPUT_DIR/rejects.jsonl with the step, and one more than `max_bad_rows` saves a checkpoint at the end of
that step and stops the run: `train()` then raises BadRowsError naming the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback

from bimode.data.records import Record
from bimode.data.rejects import REJECTS_FILE, read_rejects, reject, unique, write_rejects
from bimode.train.row_checks import BadRowsError, gather_every_process

BAD_ROWS_KEY = "bimode_bad_rows"  # anneal's batches carry the collator's rejects to the trainer under this key


class RowImages:
    """The decoded images of training row `index`, or of the next row that decodes."""

    def __init__(self, records: Sequence[Record], origins: Sequence[tuple[str | None, int | None]] | None = None):
        self.records, self.origins = records, origins
        self.failed: set[int] = set()  # rows known not to decode, passed over without decoding them again

    def load(self, index: int) -> tuple[int, list, list[dict]]:
        """(the row used, its images, rejects of the rows that failed on the way)."""
        found = []
        for step in range(len(self.records)):
            i = (index + step) % len(self.records)
            if i in self.failed:
                continue
            try:
                return i, self.records[i].load_images(), found
            except ValueError as exc:  # to_pil's UsageError: the pixels do not decode
                self.failed.add(i)
                file, row = self.origins[i] if self.origins is not None else (None, None)
                found.append(reject(str(exc), file=file, row=row, field="images", id=self.records[i].id))
        raise BadRowsError(f"no training row's images decode: {found[-1]['reason'] if found else 'no rows'}")


class BadRowsMixin:
    """For Trainer subclasses (args with max_bad_rows): `note_bad_rows` after each decode on every process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bad_row_keys: set[str] = set()
        self.bad_rows_stop = False
        self.add_callback(StopPastBadRows(self))

    def note_bad_rows(self, found: list[dict]) -> None:
        """Count this process's failed rows with every other process's (every process calls this at the same
        points); the first process writes the new ones; past max_bad_rows the run stops after this step."""
        accelerator = self.accelerator
        if accelerator.num_processes > 1:  # a count first: the lists travel only in a step that has some
            import torch.distributed as dist

            count = torch.tensor([len(found)], device=accelerator.device)
            dist.all_reduce(count)
            if not count.item():
                return
            found = [r for part in gather_every_process(found) for r in part]
        new = [r for r in unique({**r, "step": self.state.global_step + 1} for r in found)
               if _key(r) not in self.bad_row_keys]
        if not new:
            return
        self.bad_row_keys.update(_key(r) for r in new)
        if accelerator.is_main_process:
            path = Path(self.args.output_dir) / REJECTS_FILE
            write_rejects(path, read_rejects(path) + new)
        if len(self.bad_row_keys) > self.args.max_bad_rows:
            self.bad_rows_stop = True

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        if self.bad_rows_stop:
            step, n = self.state.global_step, len(self.bad_row_keys)
            raise BadRowsError(
                f"stopped after step {step}: {n} row{'s' * (n != 1)} failed to decode during training, more "
                f"than max_bad_rows {self.args.max_bad_rows} (each named in "
                f"{Path(self.args.output_dir) / REJECTS_FILE}); checkpoint saved to "
                f"{Path(self.args.output_dir) / f'checkpoint-{step}'}. Fix or remove the rows (or raise "
                "--max_bad_rows) and run the same command with --resume_from_checkpoint true")
        return out


def _key(r: dict) -> str:
    return f"{r.get('file')}\0{r.get('row')}\0{r.get('id')}"


class StopPastBadRows(TrainerCallback):
    """Save a checkpoint and stop at the end of the step in which the trainer went past max_bad_rows."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.bad_rows_stop:
            control.should_save = True
            control.should_training_stop = True
        return control
