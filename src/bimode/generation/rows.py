"""What both decoders of the transformers engine share: a sample's row state, the decision probabilities,
sampling (one generator per batch or per row), the thinking budget, feeding one token, and the completions.

A row is one sample of one prompt. The shared-prefix decoder (decode_shared.py) runs every row through these
helpers token by token; the plain decoder (decode_plain.py) uses the decision and the seeding rules only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from bimode.generation.types import Completion, Prompt, SamplingParams, completion_from_ids
from bimode.modes import MODE_SUFFIXES, THINK_CLOSE, ThinkingMode
from bimode.seeds import sample_seed

StopCheck = Callable[[int], bool]  # prompt index -> end its samples now


@dataclass
class Row:
    prompt_index: int
    sample_index: int
    mode: ThinkingMode
    forced: list[int]  # tokens still to feed before sampling (mode suffix, budget closing)
    suffix_left: int  # how many of `forced` belong to the prompt suffix (not generated tokens)
    suffix_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    closed: bool = False  # `</think>` seen (in the suffix or generated)
    thinking: int = 0
    sampled: int = 0  # generated tokens that count toward max_new_tokens (forced budget text does not)
    budget_hit: bool = False
    finish: str | None = None
    stop_id: int | None = None  # the end-of-turn token that ended the row
    forced_at: list[int] = field(default_factory=list)  # positions in `ids` the engine wrote (budget closing)


def decision_probs(logits: torch.Tensor, think_ids: list[int], no_think_ids: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """From the logits after `<think>`: P(think) renormalised over the two decisions, and the decision mass
    (the probability on any decision token at all)."""
    probs = torch.softmax(logits.float(), dim=-1)
    p_yes = probs[..., think_ids].sum(-1)
    p_no = probs[..., no_think_ids].sum(-1)
    return p_yes / (p_yes + p_no).clamp_min(1e-12), p_yes + p_no


def top_logprobs(logprobs: torch.Tensor | None, k: int) -> list[list[tuple[int, float]]] | None:
    """Per row, the k likeliest (token id, log-prob), likeliest first; None when not asked for. Tokens ruled out
    (-inf: an auto row's first token may only be a decision token) are left out, so a row may have fewer."""
    if logprobs is None or not k:
        return None
    values, ids = logprobs.topk(k, dim=-1)
    return [[(t, v) for t, v in zip(i, vs) if v != float("-inf")] for i, vs in zip(ids.tolist(), values.tolist())]


def cancel_stopped(rows: list[Row], active: list[int], should_stop: StopCheck | None, offset: int) -> None:
    """Mark the running rows whose prompt the caller wants stopped (checked once per prompt and step)."""
    if should_stop is None:
        return
    verdict: dict[int, bool] = {}
    for r in active:
        row = rows[r]
        if row.finish is None:
            if row.prompt_index not in verdict:
                verdict[row.prompt_index] = bool(should_stop(offset + row.prompt_index))
            if verdict[row.prompt_index]:
                row.finish = "cancelled"


def own_seeds(prompts: list[Prompt], params: SamplingParams) -> bool:
    """Whether the engine samples each prompt from its own seed: it samples, and the prompts carry seeds."""
    if params.temperature == 0 or all(p.seed is None for p in prompts):
        return False
    if any(p.seed is None for p in prompts):
        raise ValueError("either every prompt of a batch carries its own seed or none does")
    return True


def row_generators(prompts: list[Prompt], rows: list[tuple[int, int]], params: SamplingParams,
                   device: torch.device) -> list | None:
    """One generator per (prompt, sample) row where the prompts carry their own seeds and the engine samples:
    a row's draws then depend on its seed alone, not on the batch it runs in. None: the batch's generator."""
    if not own_seeds(prompts, params):
        return None
    generators = []
    for pi, si in rows:
        generator = torch.Generator(device=device)
        generator.manual_seed(sample_seed(prompts[pi].seed, si))
        generators.append(generator)
    return generators


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p: the tokens filtered out get -inf."""
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first over p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator, banned_ids: list[int]) -> torch.Tensor:
    """Next token of every row: argmax when greedy, else temperature / top-k / top-p sampling, from one
    generator for the batch or (a list) one per row. `banned_ids` (media placeholders) are never chosen."""
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(banned_ids, device=logits.device), float("-inf"))
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]
                         ).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_budget(row: Row, params: SamplingParams, tokenizer) -> None:
    """Before sampling inside an open think block: if the budget is spent, force the closing text."""
    if (params.max_thinking_tokens is not None and not row.closed and not row.forced and not row.budget_hit
            and row.thinking >= params.max_thinking_tokens):
        closing = params.budget_closing + THINK_CLOSE + "\n\n"
        row.forced = tokenizer.encode(closing, add_special_tokens=False)
        row.budget_hit = True


def advance(row: Row, token: int, forced: bool, logprob, on_token, offset: int, params: SamplingParams,
            eos_ids: set[int], think_close_id: int) -> None:
    """Record one fed token and update the row's thinking state, budget and finish reason."""
    if row.suffix_left:  # part of the prompt's mode suffix, not generated
        row.suffix_left -= 1
        row.suffix_ids.append(token)
        return
    if token in eos_ids:
        row.finish = "budget" if row.budget_hit else "stop"
        row.stop_id = token
        return
    row.ids.append(token)
    if forced:
        row.forced_at.append(len(row.ids) - 1)
    if logprob is not None:
        row.logprobs.append(logprob.logprob)
        row.top_logprobs.append(logprob.top)
    if on_token is not None:
        on_token(offset + row.prompt_index, row.sample_index, token, logprob)
    row.sampled += not forced
    if not row.closed:
        row.thinking += not forced
        if token == think_close_id:
            row.closed = True
    if row.sampled >= params.max_new_tokens:
        row.finish = "length"


def collect(prompts: list[Prompt], rows: list[Row], p_think: list[float], prompt_ids: list[list[int]], tokenizer,
            think_close_id: int) -> list[list[Completion]]:
    """Each row's completion, at its prompt's and sample's place."""
    out: list[list[Completion]] = [[None] * len(p.modes) for p in prompts]  # type: ignore[list-item]
    for row in rows:
        suffix = MODE_SUFFIXES[ThinkingMode.AUTO] + tokenizer.decode(row.suffix_ids, skip_special_tokens=False)
        completion = completion_from_ids(tokenizer, row.mode, suffix, row.ids, row.finish or "length",
                                         think_close_id, p_think[row.prompt_index], row.logprobs or None,
                                         row.forced_at, row.top_logprobs if any(row.top_logprobs) else None)
        completion.prompt_token_ids = prompt_ids[row.prompt_index]
        completion.stop_token_id = row.stop_id
        out[row.prompt_index][row.sample_index] = completion
    return out
