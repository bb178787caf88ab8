"""`bimode anneal --config RECIPE.yaml [--field value ...]`: bi-mode annealing on TRL's SFTTrainer."""

from bimode.commands.training import training_command

make_parser, main = training_command("anneal", "bimode.train.anneal:AnnealConfig", "annealed model",
                                     "configs/recipes/tiny_anneal.yaml, r4b_anneal.yaml")
