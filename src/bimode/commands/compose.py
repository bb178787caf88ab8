"""`bimode compose --vision DIR --llm DIR --out DIR`: a LLaVA-style VLM from a vision encoder and a language model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import OutputExistsError, UsageError

HELP = help_text("compose")


@dataclass
class ComposeConfig:
    vision: str = field(default="", metadata={
        "help": "vision encoder folder: SigLIP (fixed-resolution SigLIP2 included) or CLIP, the two-tower model or "
                "its vision model alone, with its preprocessor_config.json"})
    llm: str = field(default="", metadata={
        "help": "language model folder: Qwen3, Qwen2 / Qwen2.5 or Llama, with its tokenizer"})
    out: str = field(default="", metadata={"help": "folder to write the composed checkpoint and processor to"})
    vision_feature_layer: int = field(default=-1, metadata={
        "help": "which encoder layer's output the projector reads (-1: the last; LLaVA-1.5 with CLIP uses -2)"})
    seed: int = field(default=0, metadata={"help": "initialisation seed of the fresh projector"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-empty output folder"})

    def __post_init__(self):
        missing = [f"--{k}" for k in ("vision", "llm", "out") if not getattr(self, k)]
        if missing:
            raise UsageError(f"{' and '.join(missing)} required: bimode compose --vision DIR --llm DIR --out DIR")


def make_parser(prog: str = "bimode compose") -> CommandParser:
    return CommandParser((ComposeConfig,), prog=prog, description=HELP + ", with its model card (README.md in the Hub's format: docs/commands.md, 'Model cards')")


def main(cfg: ComposeConfig) -> int:
    from bimode.models.card_files import write_card
    from bimode.models.compose import compose

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OutputExistsError(f"{out} is not empty; pass --overwrite to replace it")
    compose(cfg.vision, cfg.llm, out, seed=cfg.seed, vision_feature_layer=cfg.vision_feature_layer)
    write_card(out, composed_card_facts(cfg))
    print(f"composed model written to {out} (projector fresh: train it first, e.g. --config r4b_stage1_projector)")
    return 0


def composed_card_facts(cfg: ComposeConfig):
    """The composed model's card: both parts as its base models where their Hub ids are known, their license
    where they share one."""
    from bimode.models.card import CardFacts, config_settings
    from bimode.models.card_files import lineage

    (vision_base, vision_license, _), (llm_base, llm_license, _) = lineage(cfg.vision), lineage(cfg.llm)
    return CardFacts(stage="composed", start_model=f"vision: {cfg.vision}; language model: {cfg.llm}",
                     base_model=vision_base + llm_base,
                     license=vision_license if vision_license == llm_license else None,
                     settings=config_settings(cfg, skip=("vision", "llm", "out", "overwrite")))
