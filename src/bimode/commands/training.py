"""`bimode anneal` and `bimode bpo`: TRL's trainer configs plus bimode's fields, `--config RECIPE.yaml`."""

from __future__ import annotations

import importlib

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser


def training_command(name: str, config: str, what: str, recipes: str):
    """(make_parser, main) of a training command. `config`: "module:Class" of its config (TRL's SFTConfig or
    GRPOConfig plus bimode's fields), parsed with TRL's ModelConfig (use_peft, lora_r, ...); `what` names the
    saved model in the closing line."""
    module_name, class_name = config.split(":")

    def make_parser(prog: str = f"bimode {name}") -> CommandParser:
        from trl import ModelConfig

        config_class = getattr(importlib.import_module(module_name), class_name)
        return CommandParser((config_class, ModelConfig), prog=prog,
                             description=f"{help_text(name)} (recipes: {recipes}). Saves the model to "
                                         "OUTPUT_DIR/final with its model card, README.md in the Hub's format "
                                         "(docs/commands.md, 'Model cards').")

    def main(cfg, model_args) -> int:
        return train_command(importlib.import_module(module_name).build_trainer, cfg, model_args, what, stage=name)

    return make_parser, main


def train_command(build, cfg, model_args, what: str, stage: str) -> int:
    """`bimode anneal` / `bimode bpo` once parsed (bimode/commands): build the trainer, train, save with its model
    card (README.md: the stage, start model, data and recipe, for the Hub), end."""
    from bimode.train.model_card import write_training_card
    from bimode.train.processes import end_processes
    from bimode.train.run import train_and_save

    trainer = build(cfg, model_args=model_args)
    out = train_and_save(trainer, cfg.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        write_training_card(out, stage, cfg, model_args)
        print(f"{what} saved to {out} (its model card: {out / 'README.md'})", flush=True)
    end_processes(trainer)
    return 0
