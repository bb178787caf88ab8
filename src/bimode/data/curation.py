"""Bi-mode data curation heuristics (R4B_NOTES.md section 4), as pure functions.

- performance-based: sample N non-thinking answers; if at most k are right the query gets a thinking
  target (the paper: N = 8, k = 0, "all wrong"), otherwise a direct answer;
- difficulty-based: a judge says whether the query needs reasoning; an unclear verdict stays unclear;
- duplicate and near-duplicate questions (same images, nearly the same words) are dropped;
- traces with unwanted content (a keyword list) are dropped.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections import defaultdict

from bimode.data.records import Record
from bimode.modes import extract_answer
from bimode.rewards import infer_answer_type

VERIFIABLE_TYPES = ("math", "numeric", "mc")
DEFAULT_BLOCKED_KEYWORDS = ("as an ai", "i cannot help", "i'm sorry, but", "chatgpt", "openai")


def performance_label(pass_count: int, n: int, k: int = 0) -> str:
    """'think' when at most k of n non-thinking answers were right, else 'no_think'."""
    if not 0 <= pass_count <= n:
        raise ValueError(f"pass_count {pass_count} outside 0..{n}")
    return "think" if pass_count <= k else "no_think"


def parse_verdict(text: str) -> str:
    """'think', 'no_think' or 'unparseable' from a judge's reply (its final answer only).

    Accepts REASONING / DIRECT (the default prompt), yes / no (to "does it need reasoning?") and a few
    phrasings; a reply naming both or neither is 'unparseable', never guessed.
    """
    answer = extract_answer(text)
    if answer is None:
        return "unparseable"
    words = re.findall(r"[a-z_\-]+", answer.lower())
    think = {"reasoning", "yes", "think", "thinking", "complex", "hard"}
    direct = {"direct", "no", "no_think", "simple", "easy"}
    phrase = " ".join(words)
    if re.search(r"\b(does not|doesn't|no) (need|require)s? (step|reasoning)", phrase):
        return "no_think"
    if re.search(r"\b(needs|requires) (step|reasoning)", phrase):
        return "think"
    found_think = any(w in think for w in words[:3])
    found_direct = any(w in direct for w in words[:3])
    if found_think == found_direct:
        return "unparseable"
    return "think" if found_think else "no_think"


def is_verifiable(record: Record) -> bool:
    kind = record.answer_type or (infer_answer_type(record.answer) if record.answer else None)
    return kind in VERIFIABLE_TYPES


def _normalize(text: str) -> str:
    text = text.lower().replace("<image>", " ")
    text = "".join(" " if c in string.punctuation else c for c in text)
    return " ".join(text.split())


def image_key(record: Record) -> str:
    """A hash of the record's image contents (paths and bytes alike)."""
    from bimode.data.records import _png_bytes

    digest = hashlib.sha256()
    for img in record.images:
        try:
            digest.update(_png_bytes(img) if not isinstance(img, str) else open(img, "rb").read())
        except OSError:
            digest.update(str(img).encode())
    return digest.hexdigest()


def _shingles(text: str, n: int = 3) -> set:
    words = text.split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def find_duplicates(records: list[Record], threshold: float = 0.9) -> dict[str, str]:
    """{duplicate id: id of the first record it repeats}: same images and the same normalised question,
    or word-trigram Jaccard similarity >= threshold with one before it (compared within equal images)."""
    duplicates: dict[str, str] = {}
    seen: dict[str, dict[str, str]] = defaultdict(dict)  # image key -> normalised text -> id
    shingles: dict[str, list[tuple[set, str]]] = defaultdict(list)
    for record in records:
        key = image_key(record)
        text = _normalize(record.question)
        if text in seen[key]:
            duplicates[record.id] = seen[key][text]
            continue
        mine = _shingles(text)
        for other, other_id in shingles[key]:
            union = len(mine | other)
            if union and len(mine & other) / union >= threshold:
                duplicates[record.id] = other_id
                break
        else:
            seen[key][text] = record.id
            shingles[key].append((mine, record.id))
    return duplicates


def blocked_keyword(trace: str, keywords=DEFAULT_BLOCKED_KEYWORDS) -> str | None:
    low = trace.lower()
    return next((k for k in keywords if k.lower() in low), None)
