"""`bimode export --merge ADAPTER`: a LoRA adapter folder merged into its base, a plain checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    return CommandParser((ExportConfig,), prog=prog, description=HELP)


def main(cfg: ExportConfig) -> int:
    import torch

    from bimode.models.loading import export_merged

    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    out = export_merged(cfg.merge, cfg.out, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                        overwrite=cfg.overwrite)
    print(f"merged model saved to {out}")
    return 0
