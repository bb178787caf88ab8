"""Answer rewards on the real MATH-500 and GSM8K gold answers, and their safety properties."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bimode.scoring import REWARD_STATS, accuracy_reward, infer_answer_type, mc_letter

DATA = Path(__file__).resolve().parents[2] / "benchmarks"
MATH = json.loads((DATA / "math500.json").read_text())
GSM = json.loads((DATA / "gsm8k_test.json").read_text())
THINK = "<think>\nsome work\n</think>\n\n"


def _same_value(a: str, b: str) -> bool:
    """Pairs of different problems whose gold answers are the same value (investigated misses)."""
    return a.strip() == b.strip() or a.strip().removeprefix("x=") == b.strip().removeprefix("x=")


@pytest.mark.slow
def test_math500_gold_answers_verify_boxed_and_bare_and_others_do_not():
    boxed = bare = rejected = comparable = 0
    for i, row in enumerate(MATH):
        gold, other = row["answer"], MATH[(i + 1) % len(MATH)]["answer"]
        boxed += accuracy_reward(f"{THINK}The answer is $\\boxed{{{gold}}}$.", gold, "math")
        bare += accuracy_reward(f"{THINK}${gold}$", gold, "math")
        if not _same_value(gold, other):
            comparable += 1
            rejected += accuracy_reward(f"{THINK}The answer is $\\boxed{{{other}}}$.", gold, "math") == 0
    print(f"MATH-500 agreement: boxed {boxed}/500, bare {bare}/500, wrong rejected {rejected}/{comparable}")
    # Measured 500/500, 500/500 and 497/497; the 3 excluded pairs have equal answers ('5' vs 'x=5', ...).
    assert boxed == 500 and bare == 500 and rejected == comparable


def test_gsm8k_gold_answers_verify_in_prose_and_others_do_not():
    right = rejected = comparable = 0
    for i, row in enumerate(GSM):
        gold, other = row["answer"], GSM[(i + 1) % len(GSM)]["answer"]
        right += accuracy_reward(f"<think>\n\n</think>\n\nShe makes ${gold} a day. The answer is {gold}.", gold)
        if other != gold:
            comparable += 1
            rejected += accuracy_reward(f"The answer is {other}.", gold) == 0
    print(f"GSM8K agreement: {right}/{len(GSM)}, wrong rejected {rejected}/{comparable}")
    assert right == len(GSM) and rejected == comparable


@pytest.mark.parametrize("completion, score", [
    ("<think>\nthe answer is 42\n</think>\n\n41", 0.0),  # only the text after </think> counts
    ("<think>\nworking... the answer is 42", 0.0),  # truncated: unclosed think block
    ("The answer is 42", 1.0),  # no think block: the whole text is scored
    ("<think>\n\n</think>\n\n42", 1.0),
    ("<think>\n\n</think>\n\n", 0.0),
])
def test_only_the_final_answer_is_scored(completion, score):
    assert accuracy_reward(completion, "42") == score


@pytest.mark.parametrize("answer, letter", [
    ("(B)", "B"), ("B.", "B"), ("B", "B"), ("Answer: B", "B"), ("the answer is B", "B"), ("B) cup 3", "B"),
    ("The answer is (C).", "C"), ("I am not sure", None),
])
def test_multiple_choice_letters(answer, letter):
    assert mc_letter(answer) == letter


def test_multiple_choice_by_option_text_and_scoring():
    assert accuracy_reward("<think>\n\n</think>\n\ncup 3", "B", "mc", choices=["cup 1", "cup 3", "cup 2"]) == 1.0
    assert accuracy_reward("<think>\n\n</think>\n\n(A)", "B", "mc") == 0.0
    assert accuracy_reward("<think>\n\n</think>\n\nThe answer is B", "B") == 1.0  # type inferred


def test_text_and_type_inference():
    assert accuracy_reward("The Eiffel Tower.", "eiffel tower", "text") == 1.0
    assert accuracy_reward("Big Ben", "eiffel tower", "text") == 0.0
    assert [infer_answer_type(g) for g in ("C", "1,234", "\\frac{1}{2}", "blue")] == ["mc", "numeric", "math", "text"]


def test_bounded_time_and_counted_on_main_thread_and_in_threads():
    slow = "\\boxed{(10^{10^{10}})!}"
    before = REWARD_STATS.snapshot().get("timeout", 0)
    start = time.monotonic()
    assert accuracy_reward(slow, "2", "math", timeout_s=1) == 0.0
    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(accuracy_reward, slow, "2", "math", None, 1).result() == 0.0
    assert time.monotonic() - start < 10
    assert REWARD_STATS.snapshot().get("timeout", 0) >= before + 2


def test_threads_give_the_same_scores_as_the_main_thread():
    rows = MATH[:20]
    completions = [f"{THINK}\\boxed{{{r['answer']}}}" for r in rows] + [f"{THINK}\\boxed{{7}}" for r in rows]
    golds = [r["answer"] for r in rows] * 2
    main = [accuracy_reward(c, g, "math") for c, g in zip(completions, golds)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda cg: accuracy_reward(cg[0], cg[1], "math"), zip(completions, golds)))
    assert threaded == main and sum(main) >= 20


def test_bad_input_scores_zero_without_raising():
    assert accuracy_reward("\\boxed{\\frac{", "\\frac{1}{2}", "math") == 0.0
    assert accuracy_reward("42", "42", "essay") == 0.0
    assert accuracy_reward("42", "") == 0.0
