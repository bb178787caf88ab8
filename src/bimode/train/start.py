"""Where a training command starts: the model and the record files."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.errors import UsageError


@dataclass
class StartFields:
    """Where a training command starts: the model and the record files (`load_start` reads them)."""

    model_path: str = field(default="", metadata={
        "help": "local model directory or adapter folder to start from (annealing: the annotator or base; BPO: "
                "an annealed model)"})
    train_files: list[str] = field(default_factory=list, metadata={
        "help": "record files to train on (BPO: prompts with gold answers to reward)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "true: resume from the latest fully written OUTPUT_DIR/checkpoint-N, or start at step 0 where there "
                "is none, so the same command starts a run and resumes it after a kill; a checkpoint folder: "
                "resume from it (README, 'Reliability')"})


def load_start(cfg, model=None, processor=None, what: str = "records to train on", model_args=None):
    """The model (cfg.model_path unless given) and the rows of cfg.train_files, in file order, each with its file
    and row (row_checks.ReadRows: rows that do not read as records come back as rejects, for the check before step 1).

    model_args: TRL's ModelConfig (dtype, attention, QLoRA flags; model_name_or_path stands in for an empty
    model_path). A PEFT adapter folder starts full training merged; LoRA on it would stack a second adapter
    whose saved base lacks the first, so that asks for `bimode export --merge` first.
    """
    import torch

    from bimode.models import load_model
    from bimode.models.loading import adapter_base
    from bimode.train.adapters import model_load_kwargs
    from bimode.train.row_checks import read_rows

    if model is None:
        path = cfg.model_path or (model_args.model_name_or_path if model_args is not None else "") or ""
        if not path:
            raise UsageError("model_path is empty: give the local model directory to start from")
        use_peft = model_args is not None and model_args.use_peft
        if use_peft and adapter_base(path) is not None:
            raise UsageError(f"model_path {path} is a LoRA adapter: merge it into a full checkpoint first "
                             f"(bimode export --merge {path} --out DIR) and start from DIR")
        kwargs = model_load_kwargs(model_args) if model_args is not None else {"dtype": torch.float32}
        model, processor = load_model(path, trust_remote_code=cfg.trust_remote_code, merge_adapter=True, **kwargs)
    if not cfg.train_files:
        raise UsageError(f"train_files is empty: give {what}")
    return model, processor, read_rows(cfg.train_files)
