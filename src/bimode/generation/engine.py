"""The transformers backend: batched, KV-cached generation with shared-prefix sample groups.

Every prompt is rendered once in auto mode, so it ends with `<think>`: the part all three modes share.
That prefix (image encoding included) is prefilled once; its cache is copied to each of the prompt's n
samples, and each sample's remaining mode suffix (`\\n` for think, `\\n\\n</think>\\n\\n` for no_think,
nothing for auto) is fed as forced tokens in the decode loop. A bi-mode group of g think + g no_think
samples therefore costs one prefill, not 2g (vLLM's prefix caching does the same on GPU; TRL's
transformers path repeats the prompt n times). The prefill's last logits are the auto-mode decision, so
`p_think` comes for free. The thinking budget is forced tokens too: a closing sentence and `</think>\\n\\n`.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Callable

import torch

from bimode.compat.transformers_api import returned_cache, with_cache
from bimode.generation.types import (Completion, Prompt, SamplingParams, TokenCallback, TokenLogprob,
                                     completion_from_ids)
from bimode.modes import MODE_SUFFIXES, THINK_CLOSE, ThinkingMode, mode_decision
from bimode.seeds import derive_seed, sample_seed



@dataclass
class _Row:
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


def _decision(logits: torch.Tensor, think_ids: list[int], no_think_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """From the logits after `<think>`: P(think) renormalised over the two decisions, and the decision mass
    (the probability on any decision token at all)."""
    probs = torch.softmax(logits.float(), dim=-1)
    p_yes = probs[..., think_ids].sum(-1)
    p_no = probs[..., no_think_ids].sum(-1)
    return p_yes / (p_yes + p_no).clamp_min(1e-12), p_yes + p_no


StopCheck = Callable[[int], bool]  # prompt index -> end its samples now


def _top_logprobs(logprobs: torch.Tensor | None, k: int) -> list[list[tuple[int, float]]] | None:
    """Per row, the k likeliest (token id, log-prob), likeliest first; None when not asked for. Tokens ruled out
    (-inf: an auto row's first token may only be a decision token) are left out, so a row may have fewer."""
    if logprobs is None or not k:
        return None
    values, ids = logprobs.topk(k, dim=-1)
    return [[(t, v) for t, v in zip(i, vs) if v != float("-inf")] for i, vs in zip(ids.tolist(), values.tolist())]


def _cancel(rows: list, active: list[int], should_stop: StopCheck | None, offset: int) -> None:
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


_MEDIA_TOKEN_ATTRS = ("image_token", "video_token", "boi_token", "eoi_token")
_MEDIA_ID_ATTRS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index", "boi_token_index",
                   "eoi_token_index", "vision_start_token_id", "vision_end_token_id")


def media_token_ids(processor, tokenizer, config=None) -> list[int]:
    """Image / video placeholder and marker ids: a response must never contain one (an untrained model samples
    them, and a placeholder in a completion breaks the model's image-token count on the next forward pass).
    Families name them differently (Gemma 3: the processor's image token is the begin-of-image marker, the
    tokenizer's the soft image token), so the processor, the tokenizer and the model config are all read."""
    ids = set()
    for owner in (processor, tokenizer):
        for attr in _MEDIA_TOKEN_ATTRS:
            token = getattr(owner, attr, None)
            if isinstance(token, str):
                token_id = tokenizer.convert_tokens_to_ids(token)
                if token_id is not None and token_id != getattr(tokenizer, "unk_token_id", None):
                    ids.add(token_id)
    for attr in _MEDIA_ID_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and 0 <= value < len(tokenizer):
            ids.add(value)
    return sorted(ids)


class _FirstTokenAmong:
    """A `generate` logits processor: the first new token must be one of `allowed` (auto mode's decision)."""

    def __init__(self, prompt_length: int, allowed: list[int]):
        self.prompt_length, self.allowed = prompt_length, allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != self.prompt_length:
            return scores
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[:, self.allowed] = True
        return scores.masked_fill(~keep, float("-inf"))


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
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


class _StopRequested:
    """A stopping criterion for `model.generate`: the rows whose prompt the caller wants stopped are done."""

    def __init__(self, should_stop: StopCheck, prompt_of_row: list[int]):
        self.should_stop, self.prompt_of_row = should_stop, prompt_of_row

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        verdict = {pi: bool(self.should_stop(pi)) for pi in set(self.prompt_of_row)}
        return torch.tensor([verdict[pi] for pi in self.prompt_of_row], dtype=torch.bool, device=input_ids.device)


class TransformersEngine:
    """Generation on a loaded transformers model (see module docstring)."""

    def __init__(self, model, processor, max_batch_rows: int = 64):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.decision = mode_decision(self.tokenizer)
        self.think_ids = sorted(self.decision.think_ids)
        self.no_think_ids = sorted(self.decision.no_think_ids)
        self.suffix_rest = {m: ids[1:] for m, ids in self.decision.suffix_ids.items()}  # after `<think>`
        eos = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.max_batch_rows = max_batch_rows
        # Models with multi-axis rotary positions (Qwen-VL's mrope) compute positions from the whole
        # sequence; our hand-fed positions would be wrong, so they take the plain path.
        self.shared_prefix = not hasattr(getattr(model, "model", model), "get_rope_index")
        self.banned_ids = media_token_ids(processor, self.tokenizer, getattr(model, "config", None))

    @property
    def image_tokens(self) -> int:
        """Prompt tokens one image takes (LLaVA's `image_seq_length`), 0 where the config does not say."""
        return getattr(getattr(self.model, "config", None), "image_seq_length", 0) or 0

    @property
    def context_length(self) -> int | None:
        """The language model's position limit, None where the config does not say."""
        config = getattr(self.model, "config", None)
        return getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:  # read per call: BPO swaps in the training model, which may move
        return next(self.model.parameters()).device

    # ---- inputs -------------------------------------------------------------------------------------
    def render(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> str:
        return self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True,
                                                  tokenize=False, thinking_mode=mode.value)

    def _encode(self, texts: list[str], images: list[list]) -> dict:
        """Left-padded model inputs; images[i] are the images of texts[i]."""
        self.tokenizer.padding_side = "left"
        if any(images):
            # nested per text: some processors (Gemma 3) cannot tell whose images a flat list holds
            batch = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        else:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def prompt_ids(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> list[int]:
        """The token ids the engine feeds for a prompt (image placeholders expanded), unpadded."""
        inputs = self._encode([self.render(prompt, mode)], [prompt.images])
        return inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()

    # ---- public API ---------------------------------------------------------------------------------
    def p_think(self, prompts: list[Prompt], batch_size: int = 32) -> list[float]:
        """Auto-mode thinking probability of each prompt: one forward pass, no generation."""
        return [p for p, _ in self.decision_stats(prompts, batch_size)]

    @torch.no_grad()
    def decision_stats(self, prompts: list[Prompt], batch_size: int = 32) -> list[tuple[float, float]]:
        """(p_think, decision mass) of each prompt in auto mode: p_think renormalised over the two decisions,
        and the probability the model puts on any decision token at all after `<think>`."""
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            inputs = self._encode([self.render(p) for p in chunk], [p.images for p in chunk])
            p_think, mass = _decision(self.model(**inputs, logits_to_keep=1).logits[:, -1], self.think_ids,
                                      self.no_think_ids)
            out += list(zip(p_think.tolist(), mass.tolist()))
        return out

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams = SamplingParams(),
                 on_token: TokenCallback | None = None, progress: bool = False,
                 should_stop: StopCheck | None = None) -> list[list[Completion]]:
        """Completions for every sample of every prompt, in order. `should_stop(prompt index)`, asked after every
        decoding step while a prompt's samples run: True ends them there, with finish reason "cancelled" (a
        server's client went away or ran out of time), without stopping the rest of the batch."""
        generator = torch.Generator(device=self.device)
        # unseeded: fresh entropy, not torch.seed(), which would reseed the caller's global generator too
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        results: list[list[Completion]] = []
        batches, current, rows = [], [], 0
        for p in prompts:  # chunk so that no batch exceeds max_batch_rows samples
            if current and rows + len(p.modes) > self.max_batch_rows:
                batches.append(current)
                current, rows = [], 0
            current.append(p)
            rows += len(p.modes)
        if current:
            batches.append(current)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="prompt")
        offset = 0
        for batch in batches:
            run = self._run_shared if self.shared_prefix else self._run_plain
            for i, completions in enumerate(run(batch, params, generator, on_token, offset, should_stop)):
                results.append(completions)
            offset += len(batch)
            if bar:
                bar.update(len(batch))
        if bar:
            bar.close()
        return results

    # ---- the shared-prefix path ---------------------------------------------------------------------
    def _run_shared(self, prompts, params, generator, on_token, offset, should_stop) -> list[list[Completion]]:
        inputs = self._encode([self.render(p) for p in prompts], [p.images for p in prompts])
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(**inputs, position_ids=positions, **with_cache(self.model, cache), use_cache=True,
                         logits_to_keep=1)
        cache = returned_cache(out)
        last_logits = out.logits[:, -1].float()
        p_think = _decision(last_logits, self.think_ids, self.no_think_ids)[0].tolist()

        rows, source = [], []
        for pi, p in enumerate(prompts):
            for si, mode in enumerate(p.modes):
                if mode is ThinkingMode.AUTO and params.think_threshold is not None:
                    forced_mode = ThinkingMode.THINK if p_think[pi] >= params.think_threshold else ThinkingMode.NO_THINK
                    suffix = list(self.suffix_rest[forced_mode])
                else:
                    suffix = list(self.suffix_rest[mode])
                row = _Row(pi, si, mode, forced=suffix, suffix_left=len(suffix))
                row.closed = self.decision.think_close_id in suffix
                rows.append(row)
                source.append(pi)
        index = torch.tensor(source, device=self.device)
        cache.batch_select_indices(index)
        mask = mask[index]
        next_pos = positions[index, -1] + 1
        logits = last_logits[index]
        active = list(range(len(rows)))  # rows still running, in cache order

        decision_ids = torch.tensor(self.think_ids + self.no_think_ids, device=self.device)
        own = self._row_generators(prompts, [(row.prompt_index, row.sample_index) for row in rows], params)
        first = True
        while active:
            if first and params.constrain_decision:  # the auto rows' first token is their mode decision
                free = torch.tensor([not rows[r].forced for r in active], device=self.device)
                allowed = torch.zeros_like(logits, dtype=torch.bool).index_fill(-1, decision_ids, True)
                logits = logits.masked_fill(free.unsqueeze(1) & ~allowed, float("-inf"))
            first = False
            sampled = self._sample(logits, params, [own[r] for r in active] if own else generator).tolist()
            logprobs = torch.log_softmax(logits, dim=-1) if params.logprobs else None
            top = _top_logprobs(logprobs, params.top_logprobs)
            tokens = []
            for slot, r in enumerate(active):
                row = rows[r]
                self._apply_budget(row, params)
                forced = bool(row.forced)
                token = row.forced.pop(0) if forced else sampled[slot]
                tokens.append(token)
                logprob = None
                if logprobs is not None:
                    logprob = TokenLogprob(float(logprobs[slot, token]), top[slot] if top else [])
                self._advance(row, token, forced, logprob, on_token, offset, params)
            _cancel(rows, active, should_stop, offset)
            keep = [slot for slot, r in enumerate(active) if rows[r].finish is None]
            if not keep:
                break
            if len(keep) < len(active):
                keep_index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_index)
                mask, next_pos = mask[keep_index], next_pos[keep_index]
                tokens = [tokens[s] for s in keep]
                active = [active[s] for s in keep]
            step_ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                             **with_cache(self.model, cache), use_cache=True)
            cache = returned_cache(out)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        prompt_ids = [ids[keep].tolist() for ids, keep in zip(inputs["input_ids"], inputs["attention_mask"].bool())]
        return self._collect(prompts, rows, p_think, prompt_ids)

    @staticmethod
    def _own_seeds(prompts: list[Prompt], params: SamplingParams) -> bool:
        """Whether the engine samples each prompt from its own seed: it samples, and the prompts carry seeds."""
        if params.temperature == 0 or all(p.seed is None for p in prompts):
            return False
        if any(p.seed is None for p in prompts):
            raise ValueError("either every prompt of a batch carries its own seed or none does")
        return True

    def _row_generators(self, prompts: list[Prompt], rows: list[tuple[int, int]], params: SamplingParams) -> list | None:
        """One generator per (prompt, sample) row where the prompts carry their own seeds and the engine samples:
        a row's draws then depend on its seed alone, not on the batch it runs in. None: the batch's generator."""
        if not self._own_seeds(prompts, params):
            return None
        generators = []
        for pi, si in rows:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sample_seed(prompts[pi].seed, si))
            generators.append(generator)
        return generators

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
        """Next token of every row: argmax when greedy, else temperature / top-k / top-p sampling, from one
        generator for the batch or (a list) one per row."""
        if self.banned_ids:
            logits = logits.index_fill(-1, torch.tensor(self.banned_ids, device=logits.device), float("-inf"))
        if params.temperature == 0:
            return torch.argmax(logits, dim=-1)
        probs = torch.softmax(_filter_logits(logits, params), dim=-1)
        if isinstance(generator, list):
            return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)]
                             ).squeeze(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _apply_budget(self, row: _Row, params: SamplingParams) -> None:
        """Before sampling inside an open think block: if the budget is spent, force the closing text."""
        if (params.max_thinking_tokens is not None and not row.closed and not row.forced and not row.budget_hit
                and row.thinking >= params.max_thinking_tokens):
            closing = params.budget_closing + THINK_CLOSE + "\n\n"
            row.forced = self.tokenizer.encode(closing, add_special_tokens=False)
            row.budget_hit = True

    def _advance(self, row: _Row, token: int, forced: bool, logprob, on_token, offset, params) -> None:
        """Record one fed token and update the row's thinking state, budget and finish reason."""
        if row.suffix_left:  # part of the prompt's mode suffix, not generated
            row.suffix_left -= 1
            row.suffix_ids.append(token)
            return
        if token in self.eos_ids:
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
            if token == self.decision.think_close_id:
                row.closed = True
        if row.sampled >= params.max_new_tokens:
            row.finish = "length"

    def _collect(self, prompts, rows: list[_Row], p_think, prompt_ids) -> list[list[Completion]]:
        out: list[list[Completion]] = [[None] * len(p.modes) for p in prompts]  # type: ignore[list-item]
        for row in rows:
            suffix = MODE_SUFFIXES[ThinkingMode.AUTO] + self.tokenizer.decode(row.suffix_ids, skip_special_tokens=False)
            completion = self._completion(row.mode, suffix, row.ids, row.finish or "length",
                                          p_think[row.prompt_index], row.logprobs or None, row.forced_at,
                                          row.top_logprobs if any(row.top_logprobs) else None)
            completion.prompt_token_ids = prompt_ids[row.prompt_index]
            completion.stop_token_id = row.stop_id
            out[row.prompt_index][row.sample_index] = completion
        return out

    def _completion(self, mode, suffix, ids, finish, p_think, logprobs, forced=(), top_logprobs=None) -> Completion:
        return completion_from_ids(self.tokenizer, mode, suffix, ids, finish, self.decision.think_close_id,
                                   p_think, logprobs, forced, top_logprobs)

    # ---- the plain path (models with multi-axis positions) ------------------------------------------
    def _run_plain(self, prompts, params, generator, on_token, offset, should_stop) -> list[list[Completion]]:
        """Batched `model.generate`, one call per mode (the mode text is part of those prompts): correct for every
        model, without prefix sharing."""
        if params.max_thinking_tokens is not None:
            raise NotImplementedError("the thinking budget needs the shared-prefix path; this model uses mrope")
        if params.logprobs:
            raise NotImplementedError("log-probs need the shared-prefix path; this model uses mrope")
        p_think = self.p_think(prompts)
        rows = []  # (prompt index, sample index, requested mode, mode used)
        for pi, p in enumerate(prompts):
            for si, mode in enumerate(p.modes):
                used = mode
                if mode is ThinkingMode.AUTO and params.think_threshold is not None:
                    used = ThinkingMode.THINK if p_think[pi] >= params.think_threshold else ThinkingMode.NO_THINK
                rows.append((pi, si, mode, used))
        out: list[list[Completion]] = [[None] * len(p.modes) for p in prompts]  # type: ignore[list-item]
        seeded = self._own_seeds(prompts, params)
        groups = []  # one `generate` call each: a mode's rows, or with prompts' own seeds one prompt's rows in a mode
        for used in dict.fromkeys(row[3] for row in rows):
            group = [row for row in rows if row[3] is used]
            groups += [[r for r in group if r[0] == pi] for pi in dict.fromkeys(r[0] for r in group)] if seeded else [group]
        for group in groups:
            used = group[0][3]
            inputs = self._encode([self.render(prompts[pi], used) for pi, *_ in group],
                                  [prompts[pi].images for pi, *_ in group])
            width = inputs["input_ids"].shape[1]
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=self.pad_id,
                          suppress_tokens=self.banned_ids or None, eos_token_id=sorted(self.eos_ids))
            if used is ThinkingMode.AUTO and params.constrain_decision:
                kwargs["logits_processor"] = [_FirstTokenAmong(width, self.think_ids + self.no_think_ids)]
            if should_stop is not None:
                kwargs["stopping_criteria"] = [_StopRequested(should_stop, [offset + pi for pi, *_ in group])]
            if params.temperature > 0:
                kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k or None)
            else:
                kwargs.update(do_sample=False)
            devices = [self.device] if self.device.type == "cuda" else []  # the global generators are left as found
            with torch.random.fork_rng(devices=devices) if seeded else contextlib.nullcontext():
                if seeded:  # `generate` samples from the global generator: seeded here for this prompt alone
                    torch.manual_seed(derive_seed(prompts[group[0][0]].seed, used.value))
                sequences = self.model.generate(**inputs, **kwargs)[:, width:].tolist()
            for (pi, si, mode, _), seq in zip(group, sequences):
                # a row that stopped early is padded after its end-of-turn token
                stop = next((i for i, t in enumerate(seq) if t in self.eos_ids), None)
                ids, finish = (seq, "length") if stop is None else (seq[:stop], "stop")
                if should_stop is not None and should_stop(offset + pi):
                    finish = "cancelled"
                if on_token is not None:
                    for t in ids:
                        on_token(offset + pi, si, t, None)
                out[pi][si] = self._completion(mode, used.prompt_suffix, ids, finish, p_think[pi], None)
                out[pi][si].stop_token_id = None if stop is None else seq[stop]
        return out
