"""The parts of an OpenAI chat response that `bimode serve` builds from completions (vLLM's shapes).

Reasoning goes out under both names: `reasoning` (vLLM since PR #27752, and the clients that followed) and
`reasoning_content` (older vLLM and its clients). Log-probs follow OpenAI's `choices[i].logprobs.content`: one entry
per generated token (reasoning and answer alike, the forced mode suffix excluded, as it is prompt), with its text,
its log-prob, its UTF-8 bytes and, when asked, the likeliest tokens at its position. An auto-mode answer's first
token is its mode decision, drawn from the decision tokens only: its log-prob is renormalised over them and its
alternatives are those tokens alone.
"""

from __future__ import annotations

import math

from bimode.generation.types import Completion, TokenLogprob, token_logprob
from bimode.streaming import Delta


def message(completion: Completion) -> dict:
    """The assistant message; no reasoning is None."""
    split = completion.split
    reasoning = split.reasoning or None
    return {"role": "assistant", "content": split.content, "reasoning": reasoning, "reasoning_content": reasoning}


def decision(completion: Completion) -> dict:
    """bimode's own field of a choice (`choices[i].bimode`, beside OpenAI's; clients ignore fields they do not
    know): the mode the answer took (think, no_think, or malformed: the think block never closed), auto mode's
    `p_think` when it was read (None in forced modes) and whether the thinking budget cut the reasoning short.
    A plain response and a stream's last chunk of each choice carry the same."""
    return {"mode": completion.split.mode, "p_think": completion.p_think,
            "budget_hit": completion.finish_reason == "budget"}


def delta(part: Delta) -> dict:
    out = {}
    if part.reasoning:
        out["reasoning"] = out["reasoning_content"] = part.reasoning
    if part.content:
        out["content"] = part.content
    return out


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    generated = sum(c.num_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
            "completion_tokens_details": {"reasoning_tokens": sum(c.thinking_tokens for c in completions)}}


def finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


# JSON has no -inf: what vLLM sends for a token the model rules out
NO_CHANCE = -9999.0


def _token(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return {"token": text, "logprob": logprob if math.isfinite(logprob) else NO_CHANCE,
            "bytes": list(text.encode("utf-8"))}


def logprob_entry(tokenizer, token: int, info: TokenLogprob) -> dict:
    """One token of `logprobs.content`."""
    return {**_token(tokenizer, token, info.logprob),
            "top_logprobs": [_token(tokenizer, alt, value) for alt, value in info.top]}


def logprobs(tokenizer, completion: Completion, requested: bool) -> dict | None:
    """A choice's `logprobs`: None unless the request asked for them."""
    if not requested:
        return None
    return {"content": [logprob_entry(tokenizer, token, token_logprob(completion, k))
                        for k, token in enumerate(completion.token_ids)]}
