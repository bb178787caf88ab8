"""A training run's end product: train (resuming when asked), then save where the next stage looks."""

from __future__ import annotations

import logging
from pathlib import Path

from bimode.train.checkpoint import resume_point

log = logging.getLogger(__name__)


def train_and_save(trainer, resume_from_checkpoint=None) -> Path:
    """Train (resuming when asked: "true" means the latest fully written checkpoint, if any; see resume_point)
    and save the model and processor to OUTPUT_DIR/final, where `bimode chat`, `serve`, `eval` and the next stage
    take it."""
    resume = resume_point(trainer.args.output_dir, resume_from_checkpoint)
    if trainer.accelerator.is_main_process and resume:
        log.warning("resuming from %s", resume)
    elif trainer.accelerator.is_main_process and resume_from_checkpoint in (True, "true", "True"):
        log.warning("no fully written checkpoint in %s: training from step 0", trainer.args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    out = Path(trainer.args.output_dir) / "final"
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(str(out))
    return out
