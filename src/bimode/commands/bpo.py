"""`bimode bpo --config RECIPE [--field value ...]`: Bi-mode Policy Optimization on TRL's GRPOTrainer."""

from bimode.commands.training import training_command

make_parser, main = training_command("bpo", "bimode.train.bpo.trainer:BPOConfig", "BPO model",
                                     "--config tiny_bpo or r4b_bpo; `bimode configs` lists them")
