"""The bi-mode response format: thinking modes, prompt suffixes, targets and response parsing.

Every response carries a think block (docs/r4b.md, section 2):
    thinking      <think>\\nREASONING\\n</think>\\n\\nANSWER
    non-thinking  <think>\\n\\n</think>\\n\\nANSWER
The mode is chosen by what follows the assistant header in the prompt; in auto mode the prompt ends with
`<think>` and the model's next token is its decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from bimode.errors import UsageError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ThinkingMode(str, enum.Enum):
    """The three modes. A member is its name as a string everywhere (`==`, dict keys, JSON, f-strings), so code
    compares against members while records and reports keep the plain names."""

    AUTO = "auto"
    THINK = "think"
    NO_THINK = "no_think"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value: Any = None, *, enable_thinking: bool | None = None) -> "ThinkingMode":
        """Accept our names, R-4B's (`long`, `short`), Qwen3's `enable_thinking` bool, or None (auto)."""
        if value is None:
            if enable_thinking is None:
                return cls.AUTO
            value = enable_thinking
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.THINK if value else cls.NO_THINK
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            if key in _ALIASES:
                return _ALIASES[key]
        raise UsageError(
            f"unknown thinking mode {value!r}: expected one of "
            f"{', '.join(sorted(_ALIASES))} or a bool (enable_thinking)"
        )

    @property
    def prompt_suffix(self) -> str:
        """Text appended after `<|im_start|>assistant\\n` to put the model in this mode."""
        return MODE_SUFFIXES[self]


def parse_mode_field(name: str, value) -> str:
    """A config field's mode, by any accepted name, as its plain name; the error names the field."""
    try:
        return ThinkingMode.parse(value).value
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


_ALIASES = {
    "auto": ThinkingMode.AUTO,
    "think": ThinkingMode.THINK,
    "thinking": ThinkingMode.THINK,
    "long": ThinkingMode.THINK,
    "no_think": ThinkingMode.NO_THINK,
    "nothink": ThinkingMode.NO_THINK,
    "non_thinking": ThinkingMode.NO_THINK,
    "short": ThinkingMode.NO_THINK,
}

MODE_SUFFIXES = {
    ThinkingMode.AUTO: THINK_OPEN,
    ThinkingMode.THINK: THINK_OPEN + "\n",
    ThinkingMode.NO_THINK: THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n",
}

def decision_tokens(tokenizer) -> dict[str, int]:
    """Per forced mode, how many tokens auto mode generates that the forced mode is given in its prompt: the
    decision after `<think>` and, for a direct answer, the closing tags (`\n` for think, `\n\n</think>\n\n` for
    no_think). A forced mode's token count leaves them out, so a router that picks between the forced modes (the
    oracle router) pays them on top when auto mode takes its decisions."""
    after_open = len(MODE_SUFFIXES[ThinkingMode.AUTO])
    return {mode.value: len(tokenizer(MODE_SUFFIXES[mode][after_open:], add_special_tokens=False)["input_ids"])
            for mode in (ThinkingMode.THINK, ThinkingMode.NO_THINK)}


# Names R-4B's processor uses for `thinking_mode=`; our template accepts these and ours.
R4B_NAMES = {ThinkingMode.AUTO: "auto", ThinkingMode.THINK: "long", ThinkingMode.NO_THINK: "short"}


def format_target(answer: str, reasoning: str | None = None) -> str:
    """The assistant training target: a think block (empty for non-thinking) then the answer."""
    answer = answer.strip()
    if reasoning is None or not reasoning.strip():
        return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{answer}"
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer}"


# Parsed-response modes: the two real modes plus two ways a response can lack a usable think block.
PARSED_MODES = ("think", "no_think", "malformed", "none")


@dataclass(frozen=True)
class ParsedResponse:
    reasoning: str
    answer: str
    mode: str  # one of PARSED_MODES

    @property
    def thought(self) -> bool:
        return self.mode == "think"


def parse_response(text: str) -> ParsedResponse:
    """Split a response into reasoning and answer and tell its mode.

    - The answer is the text after the last `</think>` (what scoring uses).
    - `think` if the think block holds non-whitespace text, `no_think` if it is empty.
    - `malformed` if a think block is opened and never closed (a truncated output): no answer.
    - `none` if there is no think tag at all: the whole text is the answer.
    A response that starts inside the block (the prompt ended with `<think>`) and closes it counts as a
    block opened at the start, as vLLM's Qwen3 reasoning parser does.
    """
    last_close = text.rfind(THINK_CLOSE)
    last_open = text.rfind(THINK_OPEN)
    if last_close == -1 and last_open == -1:
        return ParsedResponse(reasoning="", answer=text.strip(), mode="none")
    if last_open > last_close:  # an opening tag after the last close: never closed
        first_open = text.find(THINK_OPEN)
        return ParsedResponse(reasoning=text[first_open + len(THINK_OPEN):].strip(), answer="", mode="malformed")
    first_open = text.find(THINK_OPEN)
    start = 0 if first_open == -1 else first_open + len(THINK_OPEN)
    reasoning = text[start:last_close].strip()
    answer = text[last_close + len(THINK_CLOSE):].strip()
    return ParsedResponse(reasoning=reasoning, answer=answer, mode="think" if reasoning else "no_think")


def extract_answer(text: str) -> str | None:
    """The scorable answer: text after the last `</think>`; None for a truncated (unclosed) response."""
    parsed = parse_response(text)
    return None if parsed.mode == "malformed" else parsed.answer


@dataclass(frozen=True)
class ModeDecision:
    """Where and how a tokenizer's responses decide their mode.

    After `<think>` the next token is the decision. `think_ids` open a thinking block (a single newline),
    `no_think_ids` close it at once (a run of two or more newlines, or `</think>` itself). Sets, not single
    ids: a model may emit any variant its vocabulary has, and detection must not depend on one id.
    """

    think_open_id: int
    think_close_id: int
    think_ids: frozenset[int]
    no_think_ids: frozenset[int]
    suffix_ids: dict  # ThinkingMode -> token ids of that mode's prompt suffix

    def decision_position(self, prompt_ids: list[int]) -> int:
        """Index of the decision token in prompt+completion: right after the last `<think>` of the prompt."""
        for i in range(len(prompt_ids) - 1, -1, -1):
            if prompt_ids[i] == self.think_open_id:
                return i + 1
        raise ValueError("prompt has no <think> token: render it in auto mode to read a mode decision")

    def mode_of_token(self, token_id: int) -> ThinkingMode | None:
        if token_id in self.think_ids:
            return ThinkingMode.THINK
        if token_id in self.no_think_ids:
            return ThinkingMode.NO_THINK
        return None


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def mode_decision(tokenizer) -> ModeDecision:
    """Find the decision token ids of a tokenizer from how it encodes the mode suffixes."""
    open_id = tokenizer.convert_tokens_to_ids(THINK_OPEN)
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    unk = getattr(tokenizer, "unk_token_id", None)
    if open_id is None or close_id is None or unk is not None and unk in (open_id, close_id):
        raise UsageError(f"tokenizer lacks {THINK_OPEN} / {THINK_CLOSE}: load the model with bimode.models.load_model")
    suffix_ids = {m: tokenizer.encode(s, add_special_tokens=False) for m, s in MODE_SUFFIXES.items()}
    if suffix_ids[ThinkingMode.AUTO] != [open_id]:
        raise UsageError(f"{THINK_OPEN} does not encode to one token: {suffix_ids[ThinkingMode.AUTO]}")
    think_first = suffix_ids[ThinkingMode.THINK][1]
    no_think_first = suffix_ids[ThinkingMode.NO_THINK][1]
    if think_first == no_think_first:
        raise UsageError(
            "the thinking suffix '<think>\\n' is a prefix of the non-thinking one: '\\n\\n' must be one token "
            "(keep whitespace runs together in the pre-tokenizer), or greedy 'thinking' closes the block"
        )
    think_ids, no_think_ids = {think_first}, {no_think_first, close_id}
    special = set(getattr(tokenizer, "all_special_ids", []))
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = _token_text(tokenizer, token_id)
        if text and not text.strip() and "\n" in text:
            (think_ids if text.count("\n") == 1 else no_think_ids).add(token_id)
    return ModeDecision(open_id, close_id, frozenset(think_ids), frozenset(no_think_ids), suffix_ids)
