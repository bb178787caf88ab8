"""A training run's end product: train (resuming when asked), then save where the next stage looks."""

from __future__ import annotations

from pathlib import Path


def train_and_save(trainer, resume_from_checkpoint=None) -> Path:
    """Train (resuming when asked; "true" means the latest checkpoint) and save the model and processor
    to OUTPUT_DIR/final, where `bimode chat`, `serve`, `eval` and the next stage take it."""
    resume = True if resume_from_checkpoint in ("true", "True", True) else resume_from_checkpoint
    trainer.train(resume_from_checkpoint=resume)
    out = Path(trainer.args.output_dir) / "final"
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(str(out))
    return out
