import pytest

from bimode.modes import (
    MODE_SUFFIXES, ThinkingMode, extract_answer, format_target, mode_decision, parse_response,
)


@pytest.mark.parametrize("value, expected", [
    (None, ThinkingMode.AUTO), ("auto", ThinkingMode.AUTO),
    ("think", ThinkingMode.THINK), ("long", ThinkingMode.THINK), ("LONG", ThinkingMode.THINK),
    ("no_think", ThinkingMode.NO_THINK), ("no-think", ThinkingMode.NO_THINK), ("short", ThinkingMode.NO_THINK),
    (True, ThinkingMode.THINK), (False, ThinkingMode.NO_THINK), (ThinkingMode.THINK, ThinkingMode.THINK),
])
def test_parse_mode_accepts_all_names(value, expected):
    assert ThinkingMode.parse(value) is expected


def test_enable_thinking_keyword_and_precedence():
    assert ThinkingMode.parse(enable_thinking=False) is ThinkingMode.NO_THINK
    assert ThinkingMode.parse(enable_thinking=True) is ThinkingMode.THINK
    assert ThinkingMode.parse("short", enable_thinking=True) is ThinkingMode.NO_THINK


@pytest.mark.parametrize("bad", ["medium", "", 3, 1.0, ["auto"]])
def test_unknown_mode_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="unknown thinking mode"):
        ThinkingMode.parse(bad)


def test_suffixes_are_r4b_s():
    assert ThinkingMode.AUTO.prompt_suffix == "<think>"
    assert ThinkingMode.THINK.prompt_suffix == "<think>\n"
    assert ThinkingMode.NO_THINK.prompt_suffix == "<think>\n\n</think>\n\n"


def test_targets_match_the_format():
    assert format_target("42", "a\nb") == "<think>\na\nb\n</think>\n\n42"
    assert format_target("42") == "<think>\n\n</think>\n\n42"
    assert format_target(" 42 ", "   ") == "<think>\n\n</think>\n\n42"
    # each target starts with its forced-mode suffix, so rollouts and targets agree
    assert format_target("42", "x").startswith(MODE_SUFFIXES[ThinkingMode.THINK])
    assert format_target("42").startswith(MODE_SUFFIXES[ThinkingMode.NO_THINK])


@pytest.mark.parametrize("text, reasoning, answer, mode", [
    ("<think>\nstep 1\n</think>\n\n42", "step 1", "42", "think"),
    ("<think>\n\n</think>\n\n42", "", "42", "no_think"),
    ("<think>   \n \t </think>\n\n42", "", "42", "no_think"),  # whitespace-only reasoning
    ("<think>\nstep 1 and then", "step 1 and then", "", "malformed"),  # truncated
    ("<think>", "", "", "malformed"),
    ("just 42", "", "just 42", "none"),  # no thinking control at all
    ("", "", "", "none"),
    ("\nstep\n</think>\n\n7", "step", "7", "think"),  # prompt ended with <think>
    ("<think>a</think>x<think>b</think>\n\nfinal", "a</think>x<think>b", "final", "think"),  # repeated
    ("<think>a<think>b</think>c</think> 9", "a<think>b</think>c", "9", "think"),  # nested
    ("<think>a</think>x<think>b", "a</think>x<think>b", "", "malformed"),  # reopened, never closed
    ("</think>\n\n5", "", "5", "no_think"),
])
def test_parse_response_edge_cases(text, reasoning, answer, mode):
    parsed = parse_response(text)
    assert (parsed.reasoning, parsed.answer, parsed.mode) == (reasoning, answer, mode)


def test_extract_answer_is_none_only_for_truncated():
    assert extract_answer("<think>\nx\n</think>\n\n3") == "3"
    assert extract_answer("3") == "3"
    assert extract_answer("<think>\nx") is None


def test_mode_decision_of_tiny_tokenizer(tiny_tokenizer):
    decision = mode_decision(tiny_tokenizer)
    nl, nlnl = (tiny_tokenizer.encode(t, add_special_tokens=False) for t in ("\n", "\n\n"))
    assert len(nl) == 1 and len(nlnl) == 1
    assert nl[0] in decision.think_ids and nlnl[0] in decision.no_think_ids
    assert decision.think_close_id in decision.no_think_ids
    assert not decision.think_ids & decision.no_think_ids
    assert decision.mode_of_token(nl[0]) is ThinkingMode.THINK
    assert decision.mode_of_token(nlnl[0]) is ThinkingMode.NO_THINK
    prompt = tiny_tokenizer.encode("<|im_start|>assistant\n<think>", add_special_tokens=False)
    assert decision.decision_position(prompt) == len(prompt)
    with pytest.raises(ValueError, match="no <think>"):
        decision.decision_position(prompt[:-1])


def test_mode_decision_rejects_a_tokenizer_that_splits_double_newline(tiny_dir):
    """Trap 2: if '\\n\\n' is two '\\n' tokens, the think suffix prefixes the no-think one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<think>": 0, "</think>": 1, "\n": 2, "a": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, additional_special_tokens=["<think>", "</think>"])
    with pytest.raises(ValueError, match="prefix of the non-thinking"):
        mode_decision(tok)
