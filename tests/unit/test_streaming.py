"""The reasoning/answer split, streamed and not: deltas of any chunking add up to the whole-response split."""

import random

import pytest

from bimode.modes import ThinkingMode, format_target, parse_response
from bimode.streaming import IncrementalDecoder, ReasoningSplitter, split_reasoning

# tags, whitespace runs, words, and pieces that look like the start of a tag
VOCAB = ["<think>", "</think>", "\n", "\n\n", " ", "  \n", "the", " ball", " is", " 3", "x\n", "<", "</", "think>",
         "</thi", "nk>", "<th", "\u00e9"]


def stream(pieces: list[str]) -> tuple[str, str, bool]:
    splitter = ReasoningSplitter()
    reasoning = content = ""
    for piece in pieces:
        delta = splitter.feed(piece)
        reasoning, content = reasoning + delta.reasoning, content + delta.content
    delta = splitter.finish()
    assert splitter.split.reasoning == reasoning + delta.reasoning
    return reasoning + delta.reasoning, content + delta.content, splitter.closed


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(8, len(text)))))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("mode", list(ThinkingMode))
def test_deltas_in_any_chunking_add_up_to_the_whole_split(mode):
    rng = random.Random(hash(mode.value) % 1000)
    suffix = mode.prompt_suffix
    for _ in range(3000):
        tokens = [rng.choice(VOCAB) for _ in range(rng.randint(0, 14))]
        text = "".join(tokens)
        expected = split_reasoning(suffix + text)
        # as the engine streams it: the suffix, then one piece per token
        assert stream([suffix, *tokens]) == (expected.reasoning, expected.content, expected.closed)
        # any chunking, tags and suffix cut anywhere
        assert stream(random_chunks(rng, suffix + text)) == (expected.reasoning, expected.content, expected.closed)
        if mode is ThinkingMode.NO_THINK:  # the forced suffix closed the block: nothing generated is reasoning
            assert expected.reasoning == "" and expected.closed


def test_nothing_is_sent_twice_or_taken_back():
    splitter = ReasoningSplitter()
    sent = []
    for piece in ["<think>\n\n</think>\n\n", "The", " ball", " <think>", " is", "</think>", " 3", "\n"]:
        delta = splitter.feed(piece)
        assert not delta.reasoning
        sent.append(delta.content)
    sent.append(splitter.finish().content)
    assert "".join(sent) == "The ball <think> is</think> 3"
    assert sent[1:3] == ["The", " ball"]  # content streams as it comes, tags in it stay content


# every (reasoning, mode) whose target continues the mode's prompt suffix (a thinking target cannot follow
# the no_think suffix)
WELL_FORMED = [(reasoning, mode) for reasoning in (None, "", "the ball is under cup 2", "a\n\nb")
               for mode in ThinkingMode if format_target("3", reasoning).startswith(mode.prompt_suffix)]


@pytest.mark.parametrize("reasoning, mode", WELL_FORMED)
def test_well_formed_responses_split_as_parse_response_does(reasoning, mode):
    target = format_target("3", reasoning)  # <think>...</think>\n\n3
    suffix = mode.prompt_suffix
    split, parsed = split_reasoning(target), parse_response(target)
    assert (split.reasoning, split.content, split.mode) == (parsed.reasoning, parsed.answer, parsed.mode)
    assert stream([suffix, target[len(suffix):]])[:2] == (parsed.reasoning, parsed.answer)


@pytest.mark.parametrize("text, reasoning, content, mode", [
    ("<think>\nabc\n</think>\n\n3", "abc", "3", "think"),
    ("<think>\n\n</think>\n\n3", "", "3", "no_think"),
    ("<think>\nabc", "abc", "", "malformed"),  # cut off while thinking
    ("<think>\n\n</think>\n\nx <think> y", "", "x <think> y", "no_think"),  # a tag in the answer stays there
    ("<think>\n\n</think>\n\nx</think>y", "", "x</think>y", "no_think"),
    ("<think>\na<think>b</think>c", "a<think>b", "c", "think"),
    ("<think", "<think", "", "malformed"),
])
def test_split_edge_cases(text, reasoning, content, mode):
    split = split_reasoning(text)
    assert (split.reasoning, split.content, split.mode) == (reasoning, content, mode)
    assert stream(list(text)) == (reasoning, content, mode != "malformed")


def test_feed_after_finish_is_an_error():
    splitter = ReasoningSplitter()
    splitter.finish()
    with pytest.raises(RuntimeError):
        splitter.feed("x")


def test_incremental_decoder_pieces_add_up_to_the_decoded_ids(tiny_tokenizer):
    """Random ids (broken UTF-8 included): pieces never end in half a character and add up to decode(ids)."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(rng.randint(0, 40))]
        decoder = IncrementalDecoder(tiny_tokenizer)
        pieces = [decoder.add(i) for i in ids]
        full = tiny_tokenizer.decode(ids, skip_special_tokens=False)
        pieces.append(decoder.finish(full))
        assert "".join(pieces) == full
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_chat_prints_the_split(tiny_tokenizer):
    """`bimode chat`'s printer, fed token by token: [thinking] then [answer], the completion's split."""
    import io

    from bimode.chat import StreamPrinter
    from bimode.generation.types import completion_from_ids

    close_id = tiny_tokenizer.convert_tokens_to_ids("</think>")
    for mode, generated in [(ThinkingMode.AUTO, "\nthe ball\n</think>\n\n3 <think> x"),
                            (ThinkingMode.NO_THINK, "3</think> x"), (ThinkingMode.THINK, "the ball")]:
        ids = tiny_tokenizer.encode(generated, add_special_tokens=False)
        completion = completion_from_ids(tiny_tokenizer, mode, mode.prompt_suffix, ids, "stop", close_id)
        out = io.StringIO()
        printer = StreamPrinter(tiny_tokenizer, mode.prompt_suffix, out, color=False)
        for token in ids:
            printer(0, 0, token)
        printer.finish(completion)
        split = completion.split
        expected = (f"[thinking] {split.reasoning}" if split.reasoning else "") + (
            ("\n" if split.reasoning else "") + f"[answer] {split.content}" if split.content else "")
        assert out.getvalue() == expected + "\n"
