"""What every generation backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bimode.modes import ParsedResponse, ThinkingMode, parse_response

# Qwen3's thinking-budget sentence: what the engine writes when the budget runs out, before `</think>`.
BUDGET_CLOSING = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"


@dataclass
class SamplingParams:
    max_new_tokens: int = 256  # sampled tokens; forced text (mode suffix, budget closing) is not counted
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    max_thinking_tokens: int | None = None  # thinking budget; None = unlimited
    think_threshold: float | None = None  # auto mode thinks iff p_think >= threshold; None = the model decides
    # Auto mode: the token after `<think>` is drawn from the decision tokens only (think or no-think), the
    # model's own probabilities among them. Off: any token (a model whose decision mass leaked elsewhere,
    # as BPO-trained tiny models did, then writes an answer straight after `<think>`).
    constrain_decision: bool = True
    logprobs: bool = False
    budget_closing: str = BUDGET_CLOSING  # written before `</think>` when the budget runs out

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            raise ValueError("max_thinking_tokens must be >= 0")
        if self.think_threshold is not None and not 0 <= self.think_threshold <= 1:
            raise ValueError("think_threshold must be in [0, 1]")


@dataclass
class Prompt:
    """One conversation to continue, and the mode of each sample drawn from it (n = len(modes))."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)  # PIL images in placeholder order
    modes: list[ThinkingMode] = field(default_factory=lambda: [ThinkingMode.AUTO])
    id: str | None = None

    def __post_init__(self):
        self.modes = [ThinkingMode.parse(m) for m in self.modes]
        if not self.modes:
            raise ValueError("a prompt needs at least one sample mode")

    @classmethod
    def from_record(cls, record, modes=("auto",)) -> "Prompt":
        return cls(messages=record.messages(), images=record.load_images(), modes=list(modes), id=record.id)

    @classmethod
    def bimode_group(cls, record, g: int) -> "Prompt":
        """The BPO rollout shape: g samples forced into thinking, then g into non-thinking."""
        return cls.from_record(record, [ThinkingMode.THINK] * g + [ThinkingMode.NO_THINK] * g)


@dataclass
class Completion:
    mode: ThinkingMode  # the requested mode
    prompt_suffix: str  # the mode text that was part of the prompt (forced), e.g. "<think>\n"
    token_ids: list[int]  # generated tokens after the suffix, end-of-turn excluded
    text: str
    finish_reason: str  # "stop" | "length" | "budget" (the budget closed the thinking, then it stopped)
    thinking_tokens: int  # generated tokens inside the think block (its closing tag included)
    answer_tokens: int  # generated tokens after `</think>`
    p_think: float | None = None  # the prompt's auto-mode thinking probability, when read
    logprobs: list[float] | None = None
    # the auto-mode prompt ids this completion continues (its forced suffix is the start of the response);
    # the shared-prefix path has them from its prefill, so trainers need not encode the prompt again
    prompt_token_ids: list[int] | None = None
    # the end-of-turn token that stopped generation (finish "stop"/"budget"), not part of token_ids: models
    # may stop on several (Llama 3: <|eot_id|> and <|end_of_text|>), and a trainer must append the real one
    stop_token_id: int | None = None

    @property
    def response(self) -> str:
        return self.prompt_suffix + self.text

    @property
    def parsed(self) -> ParsedResponse:
        return parse_response(self.response)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def completion_from_ids(tokenizer, mode: ThinkingMode, suffix: str, ids: list[int], finish: str,
                        close_id: int, p_think: float | None = None, logprobs=None) -> Completion:
    """A Completion from generated ids (end-of-turn removed): decodes and splits the token counts."""
    from bimode.modes import THINK_CLOSE

    if close_id in ids:
        thinking = ids.index(close_id) + 1
    else:
        thinking = 0 if THINK_CLOSE in suffix else len(ids)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return Completion(mode=mode, prompt_suffix=suffix, token_ids=ids, text=text, finish_reason=finish,
                      thinking_tokens=thinking, answer_tokens=len(ids) - thinking, p_think=p_think,
                      logprobs=logprobs)
