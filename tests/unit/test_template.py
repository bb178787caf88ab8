import pytest

from bimode.modes import format_target

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the ball?"}]}
HEADER = "<|im_start|>user\n<image>Where is the ball?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("kwargs, suffix", [
    ({}, "<think>"),
    ({"thinking_mode": "auto"}, "<think>"),
    ({"thinking_mode": "think"}, "<think>\n"),
    ({"thinking_mode": "long"}, "<think>\n"),
    ({"thinking_mode": "no_think"}, "<think>\n\n</think>\n\n"),
    ({"thinking_mode": "short"}, "<think>\n\n</think>\n\n"),
    ({"thinking_mode": "no-think"}, "<think>\n\n</think>\n\n"),
    ({"enable_thinking": False}, "<think>\n\n</think>\n\n"),
    ({"enable_thinking": True}, "<think>\n"),
])
def test_generation_suffix_for_every_mode_and_alias(tiny_processor, kwargs, suffix):
    text = tiny_processor.apply_chat_template([USER], add_generation_prompt=True, tokenize=False, **kwargs)
    assert text == HEADER + suffix


def test_unknown_mode_raises(tiny_processor):
    with pytest.raises(Exception, match="unknown thinking_mode 'medium'"):
        tiny_processor.apply_chat_template([USER], add_generation_prompt=True, tokenize=False,
                                           thinking_mode="medium")


def test_training_targets_render_in_both_modes(tiny_processor):
    think = [USER, {"role": "assistant", "content": "3", "reasoning_content": "r2 b3 so 3"}]
    no_think = [USER, {"role": "assistant", "content": "3", "reasoning_content": ""}]
    plain = [USER, {"role": "assistant", "content": "3"}]
    inline = [USER, {"role": "assistant", "content": "<think>\nr2 b3 so 3\n</think>\n\n3"}]
    render = lambda m: tiny_processor.apply_chat_template(m, tokenize=False)
    assert render(think) == HEADER + format_target("3", "r2 b3 so 3") + "<|im_end|>\n"
    assert render(no_think) == HEADER + format_target("3") + "<|im_end|>\n"
    assert render(plain) == render(no_think)  # no reasoning: the empty think block, for uniformity
    assert render(inline) == render(think)


def test_multi_image_multi_turn_and_history_keeps_only_answers(tiny_processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "no", "reasoning_content": "first has red"},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "image"}]},
    ]
    text = tiny_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                              thinking_mode="short")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image><image>Same?<|im_end|>\n"
        "<|im_start|>assistant\nno<|im_end|>\n"  # earlier turn: answer only, reasoning dropped
        "<|im_start|>user\nSure?<image><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert "first has red" not in text


@pytest.mark.parametrize("mode, target", [
    ("think", format_target("3", "r2 b3 so 3")),
    ("no_think", format_target("3")),
])
def test_prefill_exactness(tiny_processor, mode, target):
    """A forced prompt's ids are a prefix of the training sequence's ids, token for token."""
    tok = tiny_processor.tokenizer
    prompt = tiny_processor.apply_chat_template([USER], add_generation_prompt=True, tokenize=False,
                                                thinking_mode=mode)
    reasoning = target.split("</think>")[0].removeprefix("<think>").strip()
    full = tiny_processor.apply_chat_template(
        [USER, {"role": "assistant", "content": "3", "reasoning_content": reasoning}], tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    full_ids = tok.encode(full, add_special_tokens=False)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    # and the suffix alone encodes to the same ids it has at the end of the prompt / start of the target
    suffix_ids = tok.encode(prompt[len(HEADER):], add_special_tokens=False)
    assert prompt_ids[-len(suffix_ids):] == suffix_ids
    assert tok.encode(target, add_special_tokens=False)[: len(suffix_ids)] == suffix_ids
