"""The transformers backend: batched, KV-cached generation with shared-prefix sample groups.

Every prompt is rendered once in auto mode, so it ends with `<think>`: the part all three modes share.
That prefix (image encoding included) is prefilled once; its cache is copied to each of the prompt's n
samples, and each sample's remaining mode suffix (`\\n` for think, `\\n\\n</think>\\n\\n` for no_think,
nothing for auto) is fed as forced tokens in the decode loop. A bi-mode group of g think + g no_think
samples therefore costs one prefill, not 2g (vLLM's prefix caching does the same on GPU; TRL's
transformers path repeats the prompt n times). The prefill's last logits are the auto-mode decision, so
`p_think` comes for free. The thinking budget is forced tokens too: a closing sentence and `</think>\\n\\n`.

This module holds the engine (inputs, the public API, batching); the two decoders are decode_shared.py (the
above, Qwen-VL's multi-axis positions included) and decode_plain.py (`model.generate`, for multi-axis models
bimode has not tested), their shared row state,
sampling and budget rows.py.
"""

from __future__ import annotations

import secrets

import torch

from bimode.generation.decode_plain import run_plain
from bimode.generation.decode_shared import run_shared
from bimode.generation.rows import StopCheck, decision_probs
from bimode.generation.types import Completion, Prompt, SamplingParams, TokenCallback
from bimode.models.positions import multi_axis_positions, shares_multi_axis_prefix
from bimode.modes import ThinkingMode, mode_decision


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
        # Multi-axis rotary positions (mrope) are fed by hand from the model's own get_rope_index: only for the
        # families whose get_rope_index bimode calls and tests (Qwen2-VL, 2.5-VL, 3-VL); others take plain generate.
        self.shared_prefix = not multi_axis_positions(model) or shares_multi_axis_prefix(model)
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

    def encode(self, texts: list[str], images: list[list]) -> dict:
        """Left-padded model inputs on the model's device; images[i] are the images of texts[i]."""
        self.tokenizer.padding_side = "left"
        if any(images):
            # nested per text: some processors (Gemma 3) cannot tell whose images a flat list holds
            batch = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        else:
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    def prompt_ids(self, prompt: Prompt, mode: ThinkingMode = ThinkingMode.AUTO) -> list[int]:
        """The token ids the engine feeds for a prompt (image placeholders expanded), unpadded."""
        inputs = self.encode([self.render(prompt, mode)], [prompt.images])
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
            inputs = self.encode([self.render(p) for p in chunk], [p.images for p in chunk])
            p_think, mass = decision_probs(self.model(**inputs, logits_to_keep=1).logits[:, -1], self.think_ids,
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
            run = run_shared if self.shared_prefix else run_plain
            results += run(self, batch, params, generator, on_token, offset, should_stop)
            offset += len(batch)
            if bar:
                bar.update(len(batch))
        if bar:
            bar.close()
        return results
