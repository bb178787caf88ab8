"""`bimode export --merge ADAPTER`: a LoRA adapter folder merged into its base, a plain checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError

HELP = help_text("export")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ExportConfig:
    merge: str = field(default="", metadata={
        "help": "adapter folder saved by `bimode anneal` / `bimode bpo` with use_peft (its adapter_config.json "
                "names the base model)"})
    out: str = field(default="", metadata={"help": "directory to write the merged model and processor to"})
    dtype: str = field(default="auto", metadata={"help": f"weights' dtype: {' | '.join(DTYPES)} (auto: the base "
                                                         "checkpoint's)"})
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty output directory"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the base checkpoint's own code"})

    def __post_init__(self):
        if not self.merge or not self.out:
            raise UsageError("--merge ADAPTER and --out are required")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")


def make_parser(prog: str = "bimode export") -> CommandParser:
    return CommandParser((ExportConfig,), prog=prog, description=HELP + ", with its model card (README.md in the Hub's format: docs/commands.md, 'Model cards')")


def main(cfg: ExportConfig) -> int:
    import torch

    from bimode.models.card_files import write_card
    from bimode.models.loading import export_merged

    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    out = export_merged(cfg.merge, cfg.out, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                        overwrite=cfg.overwrite)
    write_card(out, merged_card_facts(cfg))
    print(f"merged model saved to {out} (its model card: {Path(out) / 'README.md'})")
    return 0


def merged_card_facts(cfg: ExportConfig):
    """The merged model's card: the adapter's base models, license and stages (from its card), then the merge."""
    from bimode.models.card import CardFacts
    from bimode.models.card_files import lineage

    base, license_, earlier = lineage(cfg.merge)
    return CardFacts(stage="lora-merged", start_model=cfg.merge, base_model=base, license=license_,
                     earlier=earlier, settings={"dtype": cfg.dtype} if cfg.dtype != "auto" else {})
