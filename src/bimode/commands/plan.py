"""`bimode plan --recipe RECIPE --model DIR [--launch CONFIG] [--gpu_gib 80]`: whether a run fits before it starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError

HELP = help_text("plan")


@dataclass
class PlanConfig:
    recipe: str = field(default="", metadata={
        "help": "an anneal or BPO recipe: a YAML path or the name of one bimode ships (`bimode configs`)"})
    model: str = field(default="", metadata={
        "help": "model directory (its config.json is read on the meta device: no weights loaded); default: the "
                "recipe's model_path"})
    launch: str = field(default="", metadata={
        "help": "accelerate launch config (path or shipped name: zero2, zero3, fsdp2, ddp): processes and "
                "sharding; default one GPU, no sharding"})
    gpu_gib: float = field(default=80.0, metadata={"help": "memory of one GPU, GiB"})
    stage: str = field(default="", metadata={"help": "anneal or bpo (default: told by the recipe's fields)"})
    prompt_tokens: int = field(default=0, metadata={
        "help": "BPO: prompt length in tokens (default: the model's image tokens + 64)"})
    use_peft: str = field(default="", metadata={"help": "true / false: override the recipe's use_peft"})

    def __post_init__(self):
        if not self.recipe:
            raise UsageError("--recipe is required (an anneal or BPO recipe)")
        if self.gpu_gib <= 0 or self.prompt_tokens < 0:
            raise UsageError(f"gpu_gib must be above 0 and prompt_tokens at least 0 (got {self.gpu_gib}, "
                             f"{self.prompt_tokens})")
        if self.use_peft not in ("", "true", "false"):
            raise UsageError(f"use_peft must be true or false, not {self.use_peft!r}")


def make_parser(prog: str = "bimode plan") -> CommandParser:
    return CommandParser((PlanConfig,), prog=prog, description=HELP)


def main(cfg: PlanConfig) -> int:
    from bimode.plan.build import build_plans, load_plan_inputs
    from bimode.plan.memory import GIB, table

    overrides = {"use_peft": cfg.use_peft == "true"} if cfg.use_peft else {}
    stage, train_cfg, model_args, shape, launch, model = load_plan_inputs(cfg.recipe, cfg.model, cfg.launch,
                                                                          cfg.stage, **overrides)
    if cfg.prompt_tokens and stage != "bpo":  # anneal rows are whole records: their lengths are the recipe's
        raise UsageError(f"prompt_tokens sizes BPO's rollouts; {cfg.recipe} plans bimode {stage}, which does not "
                         "read it: leave it out")
    tokenizer = None
    if model_args.use_peft:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    result, activations = build_plans(train_cfg, model_args, stage, shape, launch, cfg.gpu_gib, cfg.prompt_tokens,
                                      tokenizer)
    print(f"bimode {stage}, {model} ({shape.total / 1e9:.2f}B parameters), {launch.num_gpus} GPU(s), "
          f"sharding {launch.sharding}")
    print(table(result))
    print(f"activations with gradient checkpointing on: {activations[True] / GIB:.2f} GiB, off: "
          f"{activations[False] / GIB:.2f} GiB")
    return 0 if result.fits else 1
