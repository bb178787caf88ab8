"""Answer rewards: is the response's final answer the gold one? Pure functions, bounded in time, never raising.

Only the text after the last `</think>` is scored; a response whose think block never closes (truncated)
scores 0; a response with no think block is scored on its whole text.
- math: math-verify (the field's LaTeX/numeric verifier), gold wrapped as `$...$`; `\\boxed{}` is preferred in
  the response, a bare final answer is accepted;
- numeric: the last number in the answer, equal to the gold within 1e-6 relative (math-verify as fallback);
- mc: a letter ("(B)", "B.", "Answer: B", "the answer is B") or an option's text when choices are known;
- text: normalised exact match (case, punctuation, articles, spacing).

math-verify runs in a helper process with a time limit and a memory cap (its own SIGALRM timeouts fail off
the main thread and cannot interrupt sympy's C-level arithmetic); letter, number and text checks run inline. A timeout or an exception scores 0 and is
counted in `REWARD_STATS`, never raised into a training loop.
"""

from __future__ import annotations

import os
import re
import string
import threading
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from bimode.compat.stdlib_api import kill_pool_processes
from bimode.modes import extract_answer

ANSWER_TYPES = ("math", "numeric", "mc", "text")
DEFAULT_TIMEOUT_S = 5


class _Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.counts: Counter = Counter()

    def add(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)


REWARD_STATS = _Stats()  # "checked", "timeout", "error", "truncated"

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_MC_PATTERNS = [
    r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])",
    r"^\(?([A-Z])\)?(?:[.):\s]|$)",
    r"\(([A-Z])\)",
]


def infer_answer_type(gold: str) -> str:
    gold = gold.strip()
    if re.fullmatch(r"[A-E]", gold):
        return "mc"
    if re.fullmatch(r"-?\d[\d,]*(?:\.\d+)?", gold):
        return "numeric"
    if re.search(r"[\\^_{}=/]|\d", gold):
        return "math"
    return "text"


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def numeric_match(answer: str, gold: str) -> bool | None:
    """True/False when both have a number; None when the answer holds none (let math-verify try)."""
    gold_value = _to_number(gold.strip())
    numbers = _NUMBER.findall(answer.replace("$", " "))
    if gold_value is None or not numbers:
        return None
    value = _to_number(numbers[-1])
    return value is not None and abs(value - gold_value) <= 1e-6 * max(1.0, abs(gold_value))


def mc_letter(answer: str, choices: list[str] | None = None) -> str | None:
    """The chosen option letter, from a letter or (with choices) from an option's text."""
    text = answer.strip()
    for pattern in _MC_PATTERNS:
        match = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        if match and match.group(1).upper() in string.ascii_uppercase[: max(5, len(choices or []))]:
            if match.group(1).isupper() or pattern.startswith("answer"):
                return match.group(1).upper()
    if choices:
        norm = normalize_text(text)
        for i, choice in enumerate(choices):
            if norm == normalize_text(choice) or norm.endswith(" " + normalize_text(choice)):
                return string.ascii_uppercase[i]
    return None


def normalize_text(text: str) -> str:
    text = text.lower().strip()
    text = "".join(c for c in text if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _math_verify(answer: str, gold: str, timeout_s: int | None) -> bool:
    import math_verify.grader
    import math_verify.parser
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if timeout_s is None:  # in the helper process our own limit applies; skip math-verify's warning
        math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True

    gold_parsed = parse(f"${gold}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                        parsing_timeout=timeout_s)
    pred = parse(answer, extraction_config=[LatexExtractionConfig(boxed_match_priority=0),
                                            ExprExtractionConfig()], parsing_timeout=timeout_s)
    if not gold_parsed or not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=timeout_s))


def _check(answer: str, gold: str, answer_type: str, choices, timeout_s: int) -> bool:
    if answer_type == "mc":
        letter = mc_letter(answer, choices)
        return letter is not None and letter == gold.strip().upper()
    if answer_type == "text":
        return normalize_text(answer) == normalize_text(gold)
    if answer_type == "numeric":
        quick = numeric_match(answer, gold)
        if quick is not None:
            return quick
    return _bounded_math_verify(answer, gold, timeout_s)


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _limit_memory(extra_bytes: int = 2 << 30) -> None:
    """In the helper: cap the address space so a runaway computation fails with MemoryError, not OOM."""
    import resource

    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, vm + extra_bytes))


def _bounded_math_verify(answer, gold, timeout_s) -> bool:
    """math-verify in a helper process: SIGALRM cannot stop sympy inside a C-level big-number computation
    (a single `(10^{10^{10}})!` took all 24 GB before an alarm could fire), a process can be killed."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import multiprocessing

            # fork: a spawned helper would re-import the caller's __main__, which breaks unguarded scripts.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            import math_verify  # noqa: F401  (imported before forking, not in the child)

            initializer = _limit_memory if os.path.exists("/proc/self/status") else None
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context(method),
                                        initializer=initializer)
        pool = _pool
    future = pool.submit(_math_verify, answer, gold, None)
    try:
        return future.result(timeout=timeout_s)
    except FutureTimeout:
        with _pool_lock:
            if _pool is pool:
                kill_pool_processes(pool)
                pool.shutdown(wait=False, cancel_futures=True)
                _pool = None
        raise TimeoutError("answer check timed out") from None


def accuracy_reward(completion: str, answer: str, answer_type: str | None = None,
                    choices: list[str] | None = None, timeout_s: int = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the response's final answer matches the gold answer, else 0.0. Never raises."""
    final = extract_answer(completion)
    if final is None:
        REWARD_STATS.add("truncated")
        return 0.0
    if not final or not answer:
        return 0.0
    kind = answer_type or infer_answer_type(answer)
    if kind not in ANSWER_TYPES:
        REWARD_STATS.add("error")
        return 0.0
    try:
        REWARD_STATS.add("checked")
        return float(_check(final, answer, kind, choices, timeout_s))
    except Exception as exc:  # math-verify and sympy raise many types on odd input
        REWARD_STATS.add("timeout" if "Timeout" in type(exc).__name__ else "error")
    return 0.0
