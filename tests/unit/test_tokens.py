"""One definition of thinking and answer tokens (generation.types.token_counts, docs/tokens.md)."""

import random

import pytest

from bimode.generation.types import completion_from_ids, token_counts
from bimode.modes import THINK_CLOSE, ThinkingMode
from bimode.streaming import split_reasoning

REASONING = "first two swaps"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)
    return tiny_tokenizer, encode, tiny_tokenizer.convert_tokens_to_ids(THINK_CLOSE)


def complete(tok, mode: ThinkingMode, generated: str, forced=()):
    tokenizer, encode, close_id = tok
    return completion_from_ids(tokenizer, mode, mode.prompt_suffix, encode(generated), "stop", close_id,
                               forced=forced)


def test_auto_mode_direct_answer_has_no_thinking_tokens(tok):
    _, encode, _ = tok
    c = complete(tok, ThinkingMode.AUTO, "\n\n</think>\n\n3")
    assert len(c.token_ids) == 4  # decision `\n\n`, `</think>`, `\n\n`, answer
    assert (c.thinking_tokens, c.answer_tokens, c.num_tokens) == (0, 4, 4)
    # the decision may also be `</think>` itself
    assert complete(tok, ThinkingMode.AUTO, "</think>\n\n3").thinking_tokens == 0


def test_auto_mode_thinking_counts_only_the_reasoning(tok):
    _, encode, _ = tok
    inner = len(encode(REASONING))
    c = complete(tok, ThinkingMode.AUTO, f"\n{REASONING}\n</think>\n\n3")
    # answer: the decision `\n`, the `\n` before `</think>`, `</think>`, `\n\n`, 3
    assert c.thinking_tokens == inner and c.answer_tokens == c.num_tokens - inner == 5
    # think mode, same reasoning: the same count (there the `\n` after `<think>` is the forced suffix)
    t = complete(tok, ThinkingMode.THINK, f"{REASONING}\n</think>\n\n3")
    assert t.response == c.response and t.thinking_tokens == inner and t.answer_tokens == 4


def test_whitespace_inside_the_reasoning_counts(tok):
    _, encode, _ = tok
    c = complete(tok, ThinkingMode.THINK, "a\n\nb\n</think>\n\n3")
    assert c.thinking_tokens == len(encode("a\n\nb")) == 3


def test_no_think_mode_never_thinks(tok):
    assert complete(tok, ThinkingMode.NO_THINK, "3").thinking_tokens == 0
    # tags in the answer of a random model: the forced suffix closed the block, they are answer tokens
    c = complete(tok, ThinkingMode.NO_THINK, "x </think> y <think> z")
    assert c.thinking_tokens == 0 and c.answer_tokens == c.num_tokens == len(c.token_ids)


def test_empty_think_block_in_think_mode(tok):
    c = complete(tok, ThinkingMode.THINK, "</think>\n\n3")
    assert c.thinking_tokens == 0 and c.answer_tokens == 3


def test_truncated_thinking_counts_everything_generated(tok):
    _, encode, _ = tok
    c = complete(tok, ThinkingMode.THINK, REASONING)
    assert c.thinking_tokens == c.num_tokens == len(encode(REASONING)) and c.answer_tokens == 0
    # auto mode: all but the decision token
    a = complete(tok, ThinkingMode.AUTO, "\n" + REASONING)
    assert a.thinking_tokens == a.num_tokens - 1


def test_the_block_ends_at_the_first_close(tok):
    _, encode, _ = tok
    c = complete(tok, ThinkingMode.THINK, "ab\n</think>\n\nc</think>d")
    assert c.thinking_tokens == len(encode("ab")) == 2


def test_forced_text_is_not_thinking(tok):
    """The thinking budget's closing sentence is written by the engine, not the model."""
    tokenizer, encode, close_id = tok
    sampled, closing = encode("ab"), encode(" Time is up.\n</think>\n\n")
    ids = sampled + closing + encode("3")
    forced = range(len(sampled), len(sampled) + len(closing))
    counts = token_counts(tokenizer, "<think>\n", ids, close_id, forced)
    assert counts.thinking == 2 and counts.thinking + counts.answer == len(ids)


def test_thinking_tokens_are_the_tokens_of_the_reasoning_text(tok):
    """Random sequences, every mode: no thinking tokens exactly when the split has no reasoning, and the
    thinking tokens decode to that reasoning (less the outer whitespace of a token like `x\\n`)."""
    tokenizer, encode, close_id = tok
    words = [encode(w) for w in ("<think>", "</think>", "\n", "\n\n", " ", "the", " ball", " 3", "x\n")]
    rng = random.Random(1)
    for _ in range(500):
        mode = rng.choice(list(ThinkingMode))
        ids = [i for _ in range(rng.randint(0, 12)) for i in rng.choice(words)]
        c = completion_from_ids(tokenizer, mode, mode.prompt_suffix, ids, "stop", close_id)
        split = split_reasoning(c.response)
        assert c.thinking_tokens + c.answer_tokens == len(ids)
        assert (c.thinking_tokens == 0) == (split.reasoning == "")
        if c.thinking_tokens:
            texts = [tokenizer.decode([i]) for i in ids]
            spans = {"".join(texts[i:i + c.thinking_tokens]).strip() for i in range(len(ids))}
            assert split.reasoning in spans
