"""The tests' reference generator: batched greedy/sampled generation with transformers' `generate`, in a
forced or auto thinking mode. The plain path the engine and the trained-model tests are checked against: kept
independent of bimode's engine on purpose (batch_size=1 for one-prompt-at-a-time generation).
"""

from __future__ import annotations

import torch

from bimode.data.records import Record
from bimode.generation.types import Completion, Prompt, completion_from_ids
from bimode.modes import THINK_CLOSE, ThinkingMode


def _messages_and_images(item: Record | Prompt) -> tuple[list[dict], list]:
    """A record's chat and images, or a prompt's (its own modes are not used: the mode is generate's)."""
    if isinstance(item, Prompt):
        return item.messages, list(item.images)
    return item.messages(), item.load_images()


def build_prompts(processor, records: list[Record | Prompt], mode) -> dict:
    """Left-padded prompt batch ending with the mode suffix."""
    mode = ThinkingMode.parse(mode)
    tokenizer = getattr(processor, "tokenizer", processor)
    chats = [_messages_and_images(r) for r in records]
    texts = [processor.apply_chat_template(messages, add_generation_prompt=True,
                                           thinking_mode=mode.value, tokenize=False) for messages, _ in chats]
    images = [img for _, chat_images in chats for img in chat_images]
    tokenizer.padding_side = "left"
    if images:
        return processor(images=images, text=texts, return_tensors="pt", padding=True)
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def generate(model, processor, records: list[Record | Prompt], mode="auto", max_new_tokens: int = 64,
             batch_size: int = 32, do_sample: bool = False, temperature: float = 1.0,
             suppress_tokens: list[int] | None = None, logprobs: bool = False) -> list[Completion]:
    """One Completion per record (or bimode Prompt) from `model.generate` on prompts ending with the mode suffix; `suppress_tokens`
    never generated (an engine's banned media tokens, to compare with that engine); logprobs: each token's
    log-probability under the model's raw logits (before suppression), as the engine reports them."""
    tokenizer = getattr(processor, "tokenizer", processor)
    mode = ThinkingMode.parse(mode)
    close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        inputs = build_prompts(processor, chunk, mode)
        result = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature if do_sample else None, top_p=None, top_k=None,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                suppress_tokens=suppress_tokens, output_logits=logprobs,
                                return_dict_in_generate=True)
        width = inputs["input_ids"].shape[1]
        for row, (record, seq) in enumerate(zip(chunk, result.sequences[:, width:].tolist())):
            ids = _until_eos(seq, tokenizer.eos_token_id, tokenizer.pad_token_id)
            finish = "stop" if tokenizer.eos_token_id in seq else "length"
            token_logprobs = None
            if logprobs:
                token_logprobs = [float(torch.log_softmax(result.logits[step][row].float(), -1)[token])
                                  for step, token in enumerate(ids)]
            out.append(completion_from_ids(tokenizer, mode, mode.prompt_suffix, ids, finish, close_id,
                                           logprobs=token_logprobs))
    return out


def _until_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    if eos_id in ids:
        return ids[: ids.index(eos_id)]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


def assert_engine_equals_plain_generate(engine, prompts: list[Prompt], max_new_tokens: int = 8) -> None:
    """The engine's greedy tokens and log-probs in each of the prompts' modes ("think", "no_think") equal plain
    `generate` run one prompt at a time (log-probs within 1e-4)."""
    import pytest

    from bimode.generation.types import SamplingParams

    batched = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, logprobs=True))
    for p, group in zip(prompts, batched):
        for mode, completion in zip(p.modes, group):
            [reference] = generate(engine.model, engine.processor, [p], mode, max_new_tokens, batch_size=1,
                                   suppress_tokens=engine.banned_ids, logprobs=True)
            assert completion.token_ids == reference.token_ids, (mode, p.messages)
            assert completion.logprobs == pytest.approx(reference.logprobs, abs=1e-4)
