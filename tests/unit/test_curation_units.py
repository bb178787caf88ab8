"""Curation heuristics and converters as pure functions."""

import json

import pytest
from PIL import Image

from bimode.data.convert import iter_converted
from bimode.curate.heuristics import blocked_keyword, find_duplicates, is_verifiable, parse_verdict, performance_label
from bimode.data.records import Record


@pytest.mark.parametrize("passes, n, k, label", [
    (0, 8, 0, "think"), (1, 8, 0, "no_think"), (8, 8, 0, "no_think"),
    (2, 8, 2, "think"), (3, 8, 2, "no_think"), (0, 1, 0, "think"),
])
def test_k_of_n_rule(passes, n, k, label):
    assert performance_label(passes, n, k) == label


def test_k_of_n_rejects_impossible_counts():
    with pytest.raises(ValueError):
        performance_label(9, 8)


# Each judge reply and the verdict it must give: the constrained word first, then free text with negations;
# hedged, contradictory, empty and truncated replies are "unclear" (the sample is rejected, never guessed).
VERDICTS = [
    # the one word the prompt asks for, as judges write it
    ("REASONING", "think"), ("DIRECT", "no_think"), ("reasoning.", "think"), ("Direct", "no_think"),
    ("**DIRECT**", "no_think"), ("Answer: REASONING", "think"), ("`direct`", "no_think"),
    ("DIRECT. The question only asks for a colour.", "no_think"), ("REASONING\n\nIt takes several steps.", "think"),
    ("Yes", "think"), ("no", "no_think"), ("no_think", "no_think"), ("<think>\nhmm\n</think>\n\nREASONING", "think"),
    # free text
    ("It requires step-by-step reasoning.", "think"), ("I think it needs reasoning.", "think"),
    ("It's hard.", "think"), ("It's easy.", "no_think"), ("A direct answer suffices.", "no_think"),
    ("The answer is DIRECT.", "no_think"), ("I think it is direct", "no_think"),
    ("It needs a single step.", "no_think"),
    # negations of reasoning -> direct
    ("It doesn't need reasoning", "no_think"), ("It doesn’t need reasoning", "no_think"),
    ("It doesnt need reasoning", "no_think"), ("This does not need reasoning.", "no_think"),
    ("Not reasoning", "no_think"), ("Non-reasoning", "no_think"), ("No need for reasoning.", "no_think"),
    ("No reasoning needed.", "no_think"), ("There is no need to reason step by step.", "no_think"),
    ("Reasoning is not needed", "no_think"), ("Reasoning: not needed", "no_think"),
    ("Reasoning is unnecessary here.", "no_think"), ("Thinking isn't required.", "no_think"),
    ("I don't think it needs reasoning.", "no_think"), ("It can be answered directly without any reasoning.", "no_think"),
    ("No, it does not need reasoning.", "no_think"), ("Does it need reasoning? No.", "no_think"),
    # negations of direct -> reasoning
    ("Not direct", "think"), ("It cannot be answered directly.", "think"), ("I don't think this is direct.", "think"),
    ("It can't be answered without reasoning.", "think"), ("A direct answer is not enough; reasoning required.", "think"),
    ("It is not a simple question; it requires several steps of reasoning.", "think"),
    ("It requires reasoning, not a direct answer.", "think"),
    # hedged, contradictory, neither, empty, truncated -> unclear
    ("REASONING or DIRECT", "unclear"), ("maybe reasoning", "unclear"), ("Probably direct.", "unclear"),
    ("Not sure.", "unclear"), ("Hard to say.", "unclear"), ("It could be either.", "unclear"),
    ("Direct, but it might need reasoning", "unclear"), ("DIRECT. Actually it needs reasoning.", "unclear"),
    ("It is simple, but not trivial.", "unclear"), ("It looks simple but needs reasoning.", "unclear"),
    ("banana", "unclear"), ("I don't know.", "unclear"), ("", "unclear"),
    ("<think>\nREASONING but truncated", "unclear"),
]


@pytest.mark.parametrize("reply, verdict", VERDICTS)
def test_verdict_parsing(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_judge_prompt_asks_for_the_two_words_the_parser_reads_first():
    from bimode.curate import default_judge_prompt

    prompt = default_judge_prompt()
    assert "{question}" in prompt and "exactly one word" in prompt
    assert "REASONING" in prompt and "DIRECT" in prompt
    assert (parse_verdict("REASONING"), parse_verdict("DIRECT")) == ("think", "no_think")


def test_verifiability():
    assert is_verifiable(Record(id="a", question="q", answer="12"))
    assert is_verifiable(Record(id="a", question="q", answer="B"))
    assert is_verifiable(Record(id="a", question="q", answer="\\frac{1}{2}", answer_type="math"))
    assert not is_verifiable(Record(id="a", question="Describe the image", answer="a red square"))
    assert not is_verifiable(Record(id="a", question="Describe the image"))


def test_duplicates_exact_near_and_image_aware():
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    records = [
        Record(id="1", question="<image>How many red cells are in the grid?", images=[red]),
        Record(id="2", question="<image>how many red cells are in the grid", images=[red]),  # exact after norm
        Record(id="3", question="<image>How many red cells are in the grid here?", images=[red]),  # near
        Record(id="4", question="<image>How many red cells are in the grid?", images=[blue]),  # other image
        Record(id="5", question="<image>What colour is the first cell?", images=[red]),
    ]
    assert find_duplicates(records, threshold=0.7) == {"2": "1", "3": "1"}
    assert find_duplicates(records, threshold=0.99) == {"2": "1"}


def test_keyword_filter():
    assert blocked_keyword("Step 1... As an AI I think") == "as an ai"
    assert blocked_keyword("r2 b3 so 3") is None
    assert blocked_keyword("use sympy", keywords=("sympy",)) == "sympy"


def _write(tmp_path, rows, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    return path


def test_llava_conversion(tmp_path):
    path = _write(tmp_path, [
        {"id": "l1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red square."}]},
        {"id": "l2", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nCount it."}, {"from": "gpt", "value": "1"},
            {"from": "human", "value": "Double it?"},
            {"from": "gpt", "value": "<think>\n1 times 2\n</think>\n\n2"}]},
    ])
    a, b = list(iter_converted(path))
    assert (a.id, a.question, a.answer, a.reasoning) == ("l1", "<image>\nWhat is shown?", "A red square.", None)
    assert a.images == [str(tmp_path / "a.png")] and a.load_images()[0].size == (8, 8)
    assert (b.question, b.answer, b.reasoning) == ("<image>\nDouble it?", "2", "1 times 2")


def test_sharegpt_and_openai_messages_conversion(tmp_path):
    path = _write(tmp_path, [
        {"id": "s1", "images": ["a.png"], "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red", "reasoning_content": "looked at it"}]},
        {"id": "s2", "messages": [{"role": "user", "content": "2+2?"}], "answer": 4},
    ])
    a, b = list(iter_converted(path, "sharegpt"))
    assert (a.question, a.answer, a.reasoning, a.system) == ("<image>Colour?", "red", "looked at it", "Be brief.")
    assert (b.question, b.answer, b.images) == ("2+2?", "4", [])


def test_plain_qa_conversion(tmp_path):
    path = _write(tmp_path, [{"question": "What colour?", "answer": "red", "image": "a.png"},
                             {"problem": "1+1", "answer": 2, "solution": "one plus one"}])
    a, b = list(iter_converted(path, "qa"))
    assert (a.id, a.question, len(a.images)) == ("in-1", "<image>\nWhat colour?", 1)
    assert (b.question, b.answer, b.reasoning) == ("1+1", "2", "one plus one")


def test_conversion_errors_name_row_and_field(tmp_path):
    path = _write(tmp_path, [{"id": "x", "conversations": []}])
    errors = []
    assert list(iter_converted(path, on_error=errors.append)) == []
    assert (errors[0].row, errors[0].field) == (1, "conversations")
