"""`bimode anneal --config RECIPE.yaml [--field value ...]`: bi-mode annealing on TRL's SFTTrainer."""

from __future__ import annotations

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser

HELP = help_text("anneal")


def make_parser(prog: str = "bimode anneal") -> CommandParser:
    from trl import ModelConfig

    from bimode.train.anneal import AnnealConfig

    # AnnealConfig is TRL's SFTConfig plus bimode's fields; ModelConfig brings use_peft, lora_r, ...
    return CommandParser((AnnealConfig, ModelConfig), prog=prog,
                         description=HELP + " (recipes: configs/recipes/tiny_anneal.yaml, r4b_anneal.yaml)")


def main(cfg, model_args) -> int:
    from bimode.train.anneal import build_trainer
    from bimode.train.checkpoint import train_command

    return train_command(build_trainer, cfg, model_args, "annealed model")
