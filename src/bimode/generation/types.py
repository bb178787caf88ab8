"""What every generation backend takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from bimode.errors import UsageError
from bimode.modes import THINK_CLOSE, ParsedResponse, ThinkingMode, parse_response
from bimode.streaming import ResponseSplit, split_reasoning



class TokenLogprob(NamedTuple):
    """A generated token's log-probability and, when asked (`SamplingParams.top_logprobs`), the likeliest
    tokens at its position: (token id, log-prob), likeliest first."""

    logprob: float
    top: list[tuple[int, float]]


# (prompt index, sample index, token id, its TokenLogprob when SamplingParams.logprobs is set, else None), as
# each token is generated
TokenCallback = Callable[[int, int, int, "TokenLogprob | None"], None]

MAX_TOP_LOGPROBS = 20  # OpenAI's limit

# Qwen3's thinking-budget sentence: what the engine writes when the budget runs out, before `</think>`.
BUDGET_CLOSING = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"


def check_think_threshold(value: float | None) -> None:
    """A think threshold is a probability (or None: the model decides); every config that takes one checks it."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise UsageError(f"think_threshold must be between 0 and 1, got {value:g}")


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
    top_logprobs: int = 0  # with logprobs: also the likeliest this many tokens at every position (at most 20)
    budget_closing: str = BUDGET_CLOSING  # written before `</think>` when the budget runs out

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UsageError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise UsageError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise UsageError("top_k must be >= 0")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            raise UsageError("max_thinking_tokens must be >= 0")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UsageError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise UsageError("top_logprobs needs logprobs")
        check_think_threshold(self.think_threshold)


@dataclass
class Prompt:
    """One conversation to continue, and the mode of each sample drawn from it (n = len(modes))."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)  # PIL images in placeholder order
    modes: list[ThinkingMode] = field(default_factory=lambda: [ThinkingMode.AUTO])
    id: str | None = None
    # This prompt's own seed (bimode.seeds): its samples are drawn from it alone, whatever batch the prompt is in;
    # None: from the batch's SamplingParams.seed.
    seed: int | None = None

    def __post_init__(self):
        self.modes = [ThinkingMode.parse(m) for m in self.modes]
        if not self.modes:
            raise ValueError("a prompt needs at least one sample mode")

    @classmethod
    def from_record(cls, record, modes=("auto",), seed: int | None = None) -> "Prompt":
        return cls(messages=record.messages(), images=record.load_images(), modes=list(modes), id=record.id,
                   seed=seed)

    @classmethod
    def from_chat(cls, messages: list[dict], modes=("auto",), id: str | None = None) -> "Prompt":
        """A prompt from chat messages whose image blocks carry their image (`{"type": "image", "image": img}`,
        as TRL hands a rollout function its prompts): each image moves to `images`, in order, and its block
        becomes the bare placeholder a record's messages hold."""
        images, out = [], []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                blocks = []
                for block in content:
                    if block.get("type") == "image" and "image" in block:
                        images.append(block["image"])
                        block = {k: v for k, v in block.items() if k != "image"}
                    blocks.append(block)
                message = {**message, "content": blocks}
            out.append(message)
        return cls(messages=out, images=images, modes=list(modes), id=id)

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
    # "stop" | "length" | "budget" (the budget closed the thinking, then it stopped) | "cancelled" (the caller's
    # should_stop asked for it: a server's client went away or ran out of time)
    finish_reason: str
    thinking_tokens: int  # the model's reasoning tokens: see token_counts (docs/tokens.md)
    answer_tokens: int  # every other generated token: the answer, tags, separators (token_counts)
    p_think: float | None = None  # the prompt's auto-mode thinking probability, when read
    logprobs: list[float] | None = None  # one per token_ids entry, with SamplingParams.logprobs
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token_ids entry, with top_logprobs > 0
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
    def split(self) -> ResponseSplit:
        """Reasoning and content as `bimode serve` and `bimode chat` show them (bimode.streaming)."""
        return split_reasoning(self.response)

    @property
    def num_tokens(self) -> int:
        """Generated tokens (forced suffix and end-of-turn excluded): thinking_tokens + answer_tokens, which is
        len(token_ids) where the backend has the ids."""
        return self.thinking_tokens + self.answer_tokens


class TokenCounts(NamedTuple):
    thinking: int
    answer: int


def token_counts(tokenizer, suffix: str, ids: list[int], close_id: int, forced: Iterable[int] = ()) -> TokenCounts:
    """The one definition of thinking and answer tokens, for every mode and backend (docs/tokens.md).

    `ids` are the generated tokens: after the mode's forced prompt suffix (`suffix`, its text; never counted),
    end-of-turn excluded. The think block is open when generation starts unless the suffix closed it
    (no_think mode, or auto mode forced by a threshold); it ends at the first generated `</think>` (`close_id`),
    or with the response if the model never wrote one (cut off while thinking).

    - thinking = the tokens inside the block from its first to its last token that is not whitespace only:
      the tokens of the reasoning text. Not thinking: the tags, the whitespace that separates the reasoning
      from the tags (the auto-mode decision token `\\n`, the `\\n` before `</think>`), the whitespace of an
      empty block (the auto-mode decision `\\n\\n`), and tokens at the positions in `forced` (text the
      engine wrote, not the model: the thinking budget's closing sentence).
    - answer = every other generated token: the answer, `</think>`, separators, forced text. So
      thinking + answer = len(ids), the generated tokens.

    An auto-mode direct answer (`\\n\\n`, `</think>`, `\\n\\n`, answer) has 0 thinking tokens; a no_think
    response always has 0; an auto-mode thinking answer and a think-mode one with the same reasoning count
    the same. The thinking tokens are those of the text `bimode.streaming.split_reasoning` returns as
    reasoning (`bimode serve`'s reasoning_content), less forced text: both end the block at the first
    `</think>`, and tags written after it are answer.
    """
    if THINK_CLOSE in suffix:
        block = 0
    else:
        block = ids.index(close_id) if close_id in ids else len(ids)

    def blank(token_id: int) -> bool:
        return not tokenizer.decode([token_id], skip_special_tokens=False).strip()

    first = 0
    while first < block and blank(ids[first]):
        first += 1
    last = block
    while last > first and blank(ids[last - 1]):
        last -= 1
    forced = set(forced)
    thinking = sum(1 for i in range(first, last) if i not in forced)
    return TokenCounts(thinking, len(ids) - thinking)


def completion_from_ids(tokenizer, mode: ThinkingMode, suffix: str, ids: list[int], finish: str,
                        close_id: int, p_think: float | None = None, logprobs=None,
                        forced: Iterable[int] = (), top_logprobs=None) -> Completion:
    """A Completion from generated ids (end-of-turn removed): decodes them and counts tokens (token_counts).

    `forced`: positions in `ids` the engine fed instead of sampling (budget closing text), not thinking.
    """
    counts = token_counts(tokenizer, suffix, ids, close_id, forced)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return Completion(mode=mode, prompt_suffix=suffix, token_ids=ids, text=text, finish_reason=finish,
                      thinking_tokens=counts.thinking, answer_tokens=counts.answer, p_think=p_think,
                      logprobs=logprobs, top_logprobs=top_logprobs)


def replay_tokens(results: list[list["Completion"]], on_token: TokenCallback, tokenizer=None) -> None:
    """Hand finished completions to `on_token` token by token (a completion without token ids is encoded with
    `tokenizer`), for backends that return whole completions (vLLM offline, an endpoint): a caller written for
    the engine's live stream (chat, serve) runs on them unchanged, only not incrementally."""
    for pi, completions in enumerate(results):
        for si, completion in enumerate(completions):
            ids = completion.token_ids
            if not ids and completion.text:
                if tokenizer is None:
                    raise ValueError("on_token needs token ids: give the backend the model's tokenizer")
                ids = tokenizer.encode(completion.text, add_special_tokens=False)
            for k, token in enumerate(ids):
                on_token(pi, si, token, token_logprob(completion, k))


def token_logprob(completion: Completion, k: int) -> TokenLogprob | None:
    """The log-probs of a completion's k-th generated token, where the backend returned them."""
    if not completion.logprobs or k >= len(completion.logprobs):
        return None
    top = completion.top_logprobs[k] if completion.top_logprobs and k < len(completion.top_logprobs) else []
    return TokenLogprob(completion.logprobs[k], top)


def request_seed(prompt: Prompt, mode: ThinkingMode, params: SamplingParams) -> int | None:
    """The seed of one request (a prompt's samples in one mode) for backends that send a request per mode (vLLM,
    an endpoint): derived from the prompt's own seed where it has one, else the batch's."""
    if prompt.seed is None:
        return params.seed
    from bimode.seeds import derive_seed

    return derive_seed(prompt.seed, mode.value)


def mode_slots(modes: list[list[ThinkingMode]]) -> list[tuple[int, ThinkingMode, list[int]]]:
    """The per-mode fan-out of a batch: (prompt index, mode, its sample indices) for each mode a prompt asks for,
    in order of first appearance. Backends that request a mode at a time (vLLM, an endpoint) send one request
    per entry and put its completions back in those slots."""
    out = []
    for pi, prompt_modes in enumerate(modes):
        for mode in dict.fromkeys(prompt_modes):
            out.append((pi, mode, [si for si, m in enumerate(prompt_modes) if m == mode]))
    return out
