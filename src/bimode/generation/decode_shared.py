"""The engine's shared-prefix decoder: one prefill per prompt, its key/value cache copied to every sample.

Every prompt is rendered in auto mode, so it ends with `<think>`, the part all three modes share. The prefill's
last logits give `p_think`; the cache is copied to each of the prompt's samples, and each sample's mode suffix
(and later a thinking budget's closing text) is fed as forced tokens in the decode loop. Positions are fed by hand:
the prompt's are the model's own (1-D, or Qwen-VL's multi-axis ones from its `get_rope_index`, images included),
and every fed token continues as text from one past the prompt's largest, on every axis (models/positions.py).
"""

from __future__ import annotations

import torch

from bimode.compat.transformers_api import empty_cache, returned_cache, select_cache_rows, with_cache
from bimode.generation.rows import (Row, StopCheck, advance, apply_budget, cancel_stopped, collect, decision_probs,
                                    row_generators, sample, top_logprobs)
from bimode.generation.types import Completion, Prompt, SamplingParams, TokenCallback, TokenLogprob
from bimode.models.positions import multi_axis_positions, next_positions, positions_from, rope_positions
from bimode.modes import ThinkingMode


def run_shared(engine, prompts: list[Prompt], params: SamplingParams, generator: torch.Generator,
               on_token: TokenCallback | None, offset: int, should_stop: StopCheck | None
               ) -> list[list[Completion]]:
    """Completions of one batch of prompts (`engine`: the TransformersEngine whose model, tokens and rules run it;
    `offset`: the batch's first prompt index, for callbacks)."""
    inputs = engine.encode([engine.render(p) for p in prompts], [p.images for p in prompts])
    mask = inputs["attention_mask"]
    multi_axis = multi_axis_positions(engine.model)
    positions = rope_positions(engine.model, inputs["input_ids"], mask, inputs.get("mm_token_type_ids"),
                               inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    out = engine.model(**inputs, position_ids=positions, **with_cache(engine.model, empty_cache()), use_cache=True,
                       logits_to_keep=1)
    cache = returned_cache(out)
    last_logits = out.logits[:, -1].float()
    p_think = decision_probs(last_logits, engine.think_ids, engine.no_think_ids)[0].tolist()

    rows = _rows(engine, prompts, params, p_think)
    index = torch.tensor([row.prompt_index for row in rows], device=engine.device)
    select_cache_rows(cache, index)
    mask = mask[index]
    next_pos = next_positions(positions)[index]
    logits = last_logits[index]
    active = list(range(len(rows)))  # rows still running, in cache order

    decision_ids = torch.tensor(engine.think_ids + engine.no_think_ids, device=engine.device)
    own = row_generators(prompts, [(row.prompt_index, row.sample_index) for row in rows], params, engine.device)
    first = True
    while active:
        if first and params.constrain_decision:  # the auto rows' first token is their mode decision
            free = torch.tensor([not rows[r].forced for r in active], device=engine.device)
            allowed = torch.zeros_like(logits, dtype=torch.bool).index_fill(-1, decision_ids, True)
            logits = logits.masked_fill(free.unsqueeze(1) & ~allowed, float("-inf"))
        first = False
        sampled = sample(logits, params, [own[r] for r in active] if own else generator, engine.banned_ids).tolist()
        logprobs = torch.log_softmax(logits, dim=-1) if params.logprobs else None
        top = top_logprobs(logprobs, params.top_logprobs)
        tokens = []
        for slot, r in enumerate(active):
            row = rows[r]
            apply_budget(row, params, engine.tokenizer)
            forced = bool(row.forced)
            token = row.forced.pop(0) if forced else sampled[slot]
            tokens.append(token)
            logprob = None
            if logprobs is not None:
                logprob = TokenLogprob(float(logprobs[slot, token]), top[slot] if top else [])
            advance(row, token, forced, logprob, on_token, offset, params, engine.eos_ids,
                      engine.decision.think_close_id)
        cancel_stopped(rows, active, should_stop, offset)
        keep = [slot for slot, r in enumerate(active) if rows[r].finish is None]
        if not keep:
            break
        if len(keep) < len(active):
            keep_index = torch.tensor(keep, device=engine.device)
            select_cache_rows(cache, keep_index)
            mask, next_pos = mask[keep_index], next_pos[keep_index]
            tokens = [tokens[s] for s in keep]
            active = [active[s] for s in keep]
        step_ids = torch.tensor(tokens, device=engine.device).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        out = engine.model(input_ids=step_ids, attention_mask=mask, position_ids=positions_from(next_pos, 1, multi_axis),
                           **with_cache(engine.model, cache), use_cache=True)
        cache = returned_cache(out)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    prompt_ids = [ids[keep].tolist() for ids, keep in zip(inputs["input_ids"], inputs["attention_mask"].bool())]
    return collect(prompts, rows, p_think, prompt_ids, engine.tokenizer, engine.decision.think_close_id)


def _rows(engine, prompts: list[Prompt], params: SamplingParams, p_think: list[float]) -> list[Row]:
    """One row per sample, in prompt order, each starting with its mode's suffix to feed (an auto sample under
    a threshold takes the mode the prompt's p_think picks)."""
    rows = []
    for pi, p in enumerate(prompts):
        for si, mode in enumerate(p.modes):
            if mode is ThinkingMode.AUTO and params.think_threshold is not None:
                forced_mode = ThinkingMode.THINK if p_think[pi] >= params.think_threshold else ThinkingMode.NO_THINK
                suffix = list(engine.suffix_rest[forced_mode])
            else:
                suffix = list(engine.suffix_rest[mode])
            row = Row(pi, si, mode, forced=suffix, suffix_left=len(suffix))
            row.closed = engine.decision.think_close_id in suffix
            rows.append(row)
    return rows
