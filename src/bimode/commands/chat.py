"""`bimode chat MODEL`: streamed chat, the reasoning shown apart from the answer."""

from __future__ import annotations

from dataclasses import dataclass, field

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError
from bimode.generation.types import check_think_threshold
from bimode.generation.defaults import DEFAULT_LIMIT_HELP
from bimode.modes import parse_mode_field

HELP = help_text("chat")


@dataclass
class ChatConfig:
    model: str = field(default="", metadata={"help": "local model directory or LoRA adapter folder (loaded with its base)"})
    prompt: str | None = field(default=None, metadata={
        "help": "one-shot question (omit for an interactive session)", "aliases": ["-p"]})
    image: list[str] = field(default_factory=list, metadata={
        "help": "image files for the first turn (repeatable, or several after one --image)", "action": "extend"})
    mode: str = field(default="auto", metadata={"help": "auto | think (long) | no_think (short)"})
    max_thinking_tokens: int | None = field(default=None, metadata={"help": "thinking budget in tokens"})
    think_threshold: float | None = field(default=None, metadata={
        "help": "auto mode thinks iff p_think >= this (pick it with `bimode eval calibrate`)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"generated-token limit (default: {DEFAULT_LIMIT_HELP})"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})

    def __post_init__(self):
        if not self.model:
            raise UsageError("bimode chat needs a MODEL: a local model directory or adapter folder")
        self.mode = parse_mode_field("mode", self.mode)
        check_think_threshold(self.think_threshold)


def make_parser(prog: str = "bimode chat") -> CommandParser:
    return CommandParser((ChatConfig,), prog=prog, description=HELP, positional={"model": "?"})


def main(cfg: ChatConfig) -> int:
    from bimode.chat import run_chat
    from bimode.generation.defaults import default_max_new_tokens
    from bimode.models.loading import adapter_base

    # the checkpoint's generation_config.json is read as a file (an adapter's: its base's); the model itself
    # is loaded once, in run_chat
    max_new_tokens = default_max_new_tokens(adapter_base(cfg.model) or cfg.model, cfg.max_new_tokens)
    return run_chat(cfg.model, cfg.prompt, cfg.image, cfg.mode, cfg.max_thinking_tokens, max_new_tokens,
                    cfg.temperature, cfg.think_threshold, cfg.trust_remote_code)
