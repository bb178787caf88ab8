"""`bimode bpo --config RECIPE.yaml [--field value ...]`: Bi-mode Policy Optimization on TRL's GRPOTrainer."""

from bimode.commands.training import training_command

make_parser, main = training_command("bpo", "bimode.train.bpo:BPOConfig", "BPO model",
                                     "configs/recipes/tiny_bpo.yaml, r4b_bpo.yaml")
