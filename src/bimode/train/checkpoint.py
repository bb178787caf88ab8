"""Trainer runs of bimode: the start model and records, strict resume for VLMs, train-then-save for the CLI."""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class StrictResumeMixin:
    """For Trainer subclasses: resume loads the checkpoint's weights through from_pretrained, strictly."""

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load checkpoint weights through from_pretrained, strictly.

        transformers 5 saves VLM checkpoints under their legacy key names (`language_model.model.*`) while
        the live model uses `model.language_model.*`; Trainer's resume loads with strict=False and so
        silently keeps the initial weights (measured: resumed runs drifted 0.0076 from uninterrupted ones).
        DeepSpeed and FSDP restore through their own checkpoints and keep the stock path.
        """
        from accelerate.utils import is_peft_model

        model = model or self.model
        # a LoRA checkpoint holds the adapter only: Trainer loads it onto the PeftModel by adapter names
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or is_peft_model(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)


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


def train_command(build, cfg, model_args, what: str) -> int:
    """`bimode anneal` / `bimode bpo` once parsed (bimode/commands): build the trainer, train, save, end."""
    trainer = build(cfg, model_args=model_args)
    out = train_and_save(trainer, cfg.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        print(f"{what} saved to {out}", flush=True)
    end_processes(trainer)
    return 0


def end_processes(trainer, teardown_s: float = 60.0) -> None:
    """Meet the other ranks, then tear the process group down before exit.

    Under `accelerate launch` on gloo a rank left with a live group sometimes aborts at interpreter exit
    ("terminate called without an active exception"), failing a launch whose training had finished; and the
    teardown itself sometimes never returns (pytorch/pytorch#75097; seen once here in about 30 CPU launches).
    Every rank has passed the barrier and the outputs are saved by then, so a teardown that outlives
    `teardown_s` is abandoned: the process exits at once, without running the interpreter's finalizers."""
    trainer.accelerator.wait_for_everyone()
    if not returns_within(trainer.accelerator.end_training, teardown_s):
        log.warning("the process-group teardown did not return within %.0f s; exiting without it", teardown_s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def returns_within(fn, seconds: float) -> bool:
    """Run fn in a daemon thread: False if it is still running after `seconds`; its exception is re-raised."""
    errors = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 (handed to the caller)
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False
    if errors:
        raise errors[0]
    return True


@dataclass
class StartFields:
    """Where a training command starts: the model and the record files (`load_start` reads them)."""

    model_path: str = field(default="", metadata={
        "help": "local model directory or adapter folder to start from (annealing: the annotator or base; BPO: "
                "an annealed model)"})
    train_files: list[str] = field(default_factory=list, metadata={
        "help": "record files to train on (BPO: prompts with gold answers to reward)"})


def load_start(cfg, model=None, processor=None, what: str = "records to train on", model_args=None):
    """The model (cfg.model_path unless given) and the records of cfg.train_files, in file order.

    model_args: TRL's ModelConfig (dtype, attention, QLoRA flags; model_name_or_path stands in for an empty
    model_path). A PEFT adapter folder starts full training merged; LoRA on it would stack a second adapter
    whose saved base lacks the first, so that asks for `bimode export --merge` first.
    """
    import torch

    from bimode.data.records import read_records
    from bimode.models import load_model
    from bimode.models.loading import adapter_base
    from bimode.train.adapters import model_load_kwargs

    if model is None:
        path = cfg.model_path or (model_args.model_name_or_path if model_args is not None else "") or ""
        if not path:
            raise ValueError("model_path is empty: give the local model directory to start from")
        use_peft = model_args is not None and model_args.use_peft
        if use_peft and adapter_base(path) is not None:
            raise ValueError(f"model_path {path} is a LoRA adapter: merge it into a full checkpoint first "
                             f"(bimode export --merge {path} --out DIR) and start from DIR")
        kwargs = model_load_kwargs(model_args) if model_args is not None else {"dtype": torch.float32}
        model, processor = load_model(path, trust_remote_code=cfg.trust_remote_code, merge_adapter=True, **kwargs)
    if not cfg.train_files:
        raise ValueError(f"train_files is empty: give {what}")
    return model, processor, {path: read_records(path) for path in cfg.train_files}
