import re

import pytest

from bimode.data import synthetic


def _key(s):
    return (s.family, s.question, s.grid)


def test_deterministic_by_seed_and_split():
    a = synthetic.generate(60, seed=7, split="train")
    b = synthetic.generate(60, seed=7, split="train")
    c = synthetic.generate(60, seed=8, split="train")
    assert [(_key(s), s.answer, s.id) for s in a] == [(_key(s), s.answer, s.id) for s in b]
    assert [_key(s) for s in a] != [_key(s) for s in c]
    assert [s.render().tobytes() for s in a[:5] if s.grid] == [s.render().tobytes() for s in b[:5] if s.grid]


def test_splits_share_no_image_question_pair():
    train = {_key(s) for s in synthetic.generate(3000, seed=0, split="train", families=synthetic.FAMILIES)}
    evals = {_key(s) for s in synthetic.generate(600, seed=1, split="eval", families=synthetic.FAMILIES)}
    assert train and evals and not train & evals


def test_families_and_levels_are_balanced():
    samples = synthetic.generate(260, seed=0, max_level=6, families=synthetic.FAMILIES)
    cells = {(s.family, s.level) for s in samples}
    expected = {(f, lv) for f in synthetic.FAMILIES for lv in synthetic.family_levels(f, 6)}
    assert cells == expected
    counts = [sum(1 for s in samples if (s.family, s.level) == c) for c in expected]
    assert max(counts) - min(counts) <= 1


def test_user_can_choose_families_and_levels():
    samples = synthetic.generate(30, families=["shell"], levels=[5, 6])
    assert {s.family for s in samples} == {"shell"} and {s.level for s in samples} == {5, 6}
    with pytest.raises(ValueError, match="unknown families"):
        synthetic.generate(3, families=["chess"])


def _simulate_shell(grid, ball=1):
    for colour in grid:
        if colour:
            a, b = synthetic.SWAPS[colour]
            ball = b if ball == a else a if ball == b else ball
    return ball


def test_answers_are_right_and_every_trace_ends_in_the_gold_answer():
    for s in synthetic.generate(500, seed=3, families=synthetic.FAMILIES):
        assert s.reasoning.split()[-1] == s.answer, s
        coloured = [c for c in (s.grid or ()) if c]
        if s.family == "count":
            assert int(s.answer) == len(coloured)
        elif s.family == "shell":
            assert int(s.answer) == _simulate_shell(s.grid) and len(coloured) == s.level
        elif s.family == "tally":
            total = 0
            for c in coloured:
                total = 0 if c == "green" else total + {"red": 1, "blue": 2}[c]
            assert int(s.answer) == total
        elif s.family == "shell_mc":
            assert s.choices[synthetic.LETTERS.index(s.answer)] == str(_simulate_shell(s.grid))
        elif s.family == "shell_text":
            start, moves = re.search(r"cup (\d)\. Swaps: (.*)\. Where", s.question).groups()
            assert int(s.answer) == _simulate_shell(moves.split(", "), int(start)) and s.grid is None and s.domain == "text"
        # level = number of steps in the trace (count is a glance: level 1)
        if s.family != "count":
            assert len(s.reasoning.split(" so ")[0].split()) == s.level


def test_rendered_image_shows_the_grid():
    s = synthetic.generate(1, families=["shell"], levels=[3])[0]
    image = s.render()
    assert image.size == (synthetic.IMAGE_PX, synthetic.IMAGE_PX)
    for index, colour in enumerate(s.grid):
        row, col = divmod(index, synthetic.GRID)
        centre = image.getpixel((col * synthetic.CELL_PX + 4, row * synthetic.CELL_PX + 4))
        assert centre == (synthetic.COLOURS[colour] if colour else synthetic.EMPTY)


def test_records_carry_every_field():
    record = synthetic.generate(10, families=["shell_mc"])[0].to_record()
    assert record.question.startswith("<image>\n") and len(record.images) == 1
    assert record.answer_type == "mc" and record.choices and record.reasoning and record.direct_answer
    assert (record.family, record.domain) == ("shell_mc", "vision") and record.level == 1
    text = synthetic.generate(1, families=["shell_text"])[0].to_record()
    assert text.images == [] and "<image>" not in text.question and text.domain == "text"
