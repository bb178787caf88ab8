"""`bimode bpo --config RECIPE.yaml [--field value ...]`: Bi-mode Policy Optimization on TRL's GRPOTrainer."""

from __future__ import annotations

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser

HELP = help_text("bpo")


def make_parser(prog: str = "bimode bpo") -> CommandParser:
    from trl import ModelConfig

    from bimode.train.bpo import BPOConfig

    # BPOConfig is TRL's GRPOConfig plus bimode's fields; ModelConfig brings use_peft, lora_r, ...
    return CommandParser((BPOConfig, ModelConfig), prog=prog,
                         description=HELP + " (recipes: configs/recipes/tiny_bpo.yaml, r4b_bpo.yaml)")


def main(cfg, model_args) -> int:
    from bimode.train.bpo import build_trainer
    from bimode.train.checkpoint import train_command

    return train_command(build_trainer, cfg, model_args, "BPO model")
