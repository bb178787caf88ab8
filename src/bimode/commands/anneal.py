"""`bimode anneal --config RECIPE [--field value ...]`: bi-mode annealing on TRL's SFTTrainer."""

from bimode.commands.training import training_command

make_parser, main = training_command("anneal", "bimode.train.anneal:AnnealConfig", "annealed model",
                                     "--config tiny_anneal or r4b_anneal; `bimode configs` lists them")
