"""The engine's plain decoder, for multi-axis rotary models other than the Qwen-VL families (those share the
prompt's prefill with positions from their own `get_rope_index`, decode_shared.py; another family's position rules
are not assumed to match): batched `model.generate`, one call per mode (the mode text is part of those prompts).
Correct for every model, without prefix sharing; no thinking budget and no log-probs.
"""

from __future__ import annotations

import contextlib

import torch

from bimode.generation.rows import StopCheck, own_seeds
from bimode.generation.types import Completion, Prompt, SamplingParams, TokenCallback, completion_from_ids
from bimode.modes import ThinkingMode
from bimode.seeds import derive_seed


class FirstTokenAmong:
    """A `generate` logits processor: the first new token must be one of `allowed` (auto mode's decision)."""

    def __init__(self, prompt_length: int, allowed: list[int]):
        self.prompt_length, self.allowed = prompt_length, allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.prompt_length:
            return scores
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[:, self.allowed] = True
        return scores.masked_fill(~keep, float("-inf"))


class StopRequested:
    """A stopping criterion for `model.generate`: the rows whose prompt the caller wants stopped are done."""

    def __init__(self, should_stop: StopCheck, prompt_of_row: list[int]):
        self.should_stop, self.prompt_of_row = should_stop, prompt_of_row

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        verdict = {pi: bool(self.should_stop(pi)) for pi in set(self.prompt_of_row)}
        return torch.tensor([verdict[pi] for pi in self.prompt_of_row], dtype=torch.bool, device=input_ids.device)


def run_plain(engine, prompts: list[Prompt], params: SamplingParams, generator: torch.Generator,
              on_token: TokenCallback | None, offset: int, should_stop: StopCheck | None) -> list[list[Completion]]:
    """Completions of one batch of prompts (`engine`: the TransformersEngine whose model, tokens and rules run it;
    `offset`: the batch's first prompt index, for callbacks). `generate` samples from the global generator, so
    `generator` is unused: prompts with their own seeds are seeded one at a time instead."""
    if params.max_thinking_tokens is not None:
        raise NotImplementedError("the thinking budget needs the shared-prefix path, which this multi-axis model "
                                  "does not take")
    if params.logprobs:
        raise NotImplementedError("log-probs need the shared-prefix path, which this multi-axis model does not take")
    p_think = engine.p_think(prompts)
    rows = []  # (prompt index, sample index, requested mode, mode used)
    for pi, p in enumerate(prompts):
        for si, mode in enumerate(p.modes):
            used = mode
            if mode is ThinkingMode.AUTO and params.think_threshold is not None:
                used = ThinkingMode.THINK if p_think[pi] >= params.think_threshold else ThinkingMode.NO_THINK
            rows.append((pi, si, mode, used))
    out: list[list[Completion]] = [[None] * len(p.modes) for p in prompts]  # type: ignore[list-item]
    seeded = own_seeds(prompts, params)
    groups = []  # one `generate` call each: a mode's rows, or with prompts' own seeds one prompt's rows in a mode
    for used in dict.fromkeys(row[3] for row in rows):
        group = [row for row in rows if row[3] is used]
        groups += [[r for r in group if r[0] == pi] for pi in dict.fromkeys(r[0] for r in group)] if seeded else [group]
    for group in groups:
        used = group[0][3]
        inputs = engine.encode([engine.render(prompts[pi], used) for pi, *_ in group],
                               [prompts[pi].images for pi, *_ in group])
        width = inputs["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=engine.pad_id,
                      suppress_tokens=engine.banned_ids or None, eos_token_id=sorted(engine.eos_ids))
        if used is ThinkingMode.AUTO and params.constrain_decision:
            kwargs["logits_processor"] = [FirstTokenAmong(width, engine.think_ids + engine.no_think_ids)]
        if should_stop is not None:
            kwargs["stopping_criteria"] = [StopRequested(should_stop, [offset + pi for pi, *_ in group])]
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
        else:
            kwargs.update(do_sample=False)
        devices = [engine.device] if engine.device.type == "cuda" else []  # the global generators are left as found
        with torch.random.fork_rng(devices=devices) if seeded else contextlib.nullcontext():
            if seeded:  # `generate` samples from the global generator: seeded here for this prompt alone
                torch.manual_seed(derive_seed(prompts[group[0][0]].seed, used.value))
            sequences = engine.model.generate(**inputs, **kwargs)[:, width:].tolist()
        for (pi, si, mode, _), seq in zip(group, sequences):
            # a row that stopped early is padded after its end-of-turn token
            stop = next((i for i, t in enumerate(seq) if t in engine.eos_ids), None)
            ids, finish = (seq, "length") if stop is None else (seq[:stop], "stop")
            if should_stop is not None and should_stop(offset + pi):
                finish = "cancelled"
            if on_token is not None:
                for t in ids:
                    on_token(offset + pi, si, t, None)
            out[pi][si] = completion_from_ids(engine.tokenizer, mode, used.prompt_suffix, ids, finish,
                                              engine.decision.think_close_id, p_think[pi], None)
            out[pi][si].stop_token_id = None if stop is None else seq[stop]
    return out
