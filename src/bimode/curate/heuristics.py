"""Bi-mode data curation heuristics (docs/r4b.md, section 4), as pure functions.

- performance-based: sample N non-thinking answers; if at most k are right the query gets a thinking
  target (the paper: N = 8, k = 0, "all wrong"), otherwise a direct answer;
- difficulty-based: a judge says whether the query needs reasoning (one word, REASONING or DIRECT; free text
  is read with its negations); an unclear verdict stays unclear and the sample is not labelled;
- duplicate and near-duplicate questions (same images, nearly the same words) are dropped;
- traces with unwanted content (a keyword list) are dropped.
"""

from __future__ import annotations

import hashlib
import re

from bimode.data.records import Record
from bimode.modes import extract_answer
from bimode.scoring import infer_answer_type

VERIFIABLE_TYPES = ("math", "numeric", "mc")
DEFAULT_BLOCKED_KEYWORDS = ("as an ai", "i cannot help", "i'm sorry, but", "chatgpt", "openai")


def performance_label(pass_count: int, n: int, k: int = 0) -> str:
    """'think' when at most k of n non-thinking answers were right, else 'no_think'."""
    if not 0 <= pass_count <= n:
        raise ValueError(f"pass_count {pass_count} outside 0..{n}")
    return "think" if pass_count <= k else "no_think"


UNCLEAR = "unclear"
VERDICTS = ("think", "no_think", UNCLEAR)

# The judge is asked for one of two words (prompts/judge_reasoning.txt); yes / no answer "does it need
# reasoning?" prompts, and the mode names are accepted as one-word replies too.
_ONE_WORD = {"reasoning": "think", "direct": "no_think", "yes": "think", "no": "no_think", "think": "think",
             "thinking": "think", "no_think": "no_think", "nothink": "no_think"}
_THINK_WORDS = {"reasoning", "thinking", "think", "steps", "complex", "hard", "difficult", "complicated",
                "calculation", "calculations", "computation", "analysis", "multistep"}
_DIRECT_WORDS = {"direct", "directly", "simple", "easy", "straightforward", "trivial", "immediate", "glance",
                 "recognition"}
_NEGATORS = {"not", "no", "never", "without", "nor", "neither", "none", "nothing"}
_NEED_WORDS = {"need", "needed", "require", "required", "necessary", "enough", "sufficient", "suffice",
               "suffices", "warranted", "involved", "useful", "helpful"}
_NEEDLESS = {"unnecessary", "unneeded", "needless", "overkill", "superfluous"}
_OPINION_SUBJECTS = {"i", "we", "you", "they"}
_HEDGES = {"maybe", "perhaps", "possibly", "probably", "likely", "might", "unsure", "unclear", "uncertain",
           "depends", "depending", "borderline", "either", "ambiguous", "both", "somewhat"}
_HEDGE_PHRASES = ("not sure", "hard to say", "hard to tell", "could be", "can not tell", "not certain")
_CONTRACTIONS = re.compile(r"\b(does|do|did|is|are|was|were|has|have|had|would|should|could|must|need|ca|can|wo)"
                           r"(?:n't|nt)\b")
_PREFIX_WINDOW = 4  # a negator this many words before a concept word negates it ("does not really need any ...")
_FIRST_WORD = re.compile(r"^(?:(?:final )?(?:answer|verdict|label|decision|classification)\s*[:=\-]\s*)?"
                         r"(no_think|nothink|reasoning|direct|thinking|think|yes|no)"
                         r"(?=$|\s*(?:[.,;!)\n]|\s[-–—]\s))")  # the word alone, or ended by punctuation


def _clean(text: str) -> str:
    text = text.lower()
    for quote in "’‘`´ʼ":
        text = text.replace(quote, "'")
    text = re.sub(r"[*#>\"“”\[\]]", " ", text)  # markdown and quotes around the word
    return text.strip(" \t'(")


def _expand(text: str) -> str:
    """Contractions and prefixes as plain words: doesn't / doesnt -> does not, cannot -> can not, non- -> not."""
    text = _CONTRACTIONS.sub(lambda m: m.group(1) + " not", text)
    text = re.sub(r"\bcannot\b", "can not", text)
    text = re.sub(r"\bnon[-\s]+", "not ", text)
    return text.replace("_", " ").replace("-", " ")


def _signals(words: list[str]) -> list[str]:
    """'think' / 'no_think' for each mention of either idea in one clause, negations applied."""
    found = []
    consumed = set()  # negators that belong to a "... is not needed" after a concept word
    for i, word in enumerate(words):
        if word in _THINK_WORDS:
            if word in ("think", "thinking") and _OPINION_SUBJECTS & set(words[max(0, i - 3):i]):
                continue  # "I think it is direct", "I don't think ...": an opinion verb, not the idea
            kind = "think"
        elif word in _DIRECT_WORDS:
            kind = "no_think"
        elif word == "step":
            before, after = words[max(0, i - 2):i], words[i + 1:i + 2]
            if {"single", "one"} & set(before):
                kind = "no_think"
            elif after == ["by"] or "multi" in before:
                kind = "think"
            else:
                continue
        elif word == "reason" and i and words[i - 1] == "to":
            kind = "think"
        else:
            continue
        negated = False
        for j in range(i + 1, min(len(words), i + 4)):  # "reasoning is not needed", "reasoning: unnecessary"
            if words[j] in _NEEDLESS:
                negated = True
                break
            if words[j] in _NEGATORS and _NEED_WORDS & set(words[j + 1:j + 3]):
                negated = True
                consumed.add(j)
                break
        prefix = sum(1 for j in range(max(0, i - _PREFIX_WINDOW), i) if words[j] in _NEGATORS and j not in consumed)
        if (prefix + negated) % 2:  # "not ... without reasoning" is two negations
            kind = "no_think" if kind == "think" else "think"
        found.append(kind)
    return found


def _free_text_verdict(text: str, hedges_count: bool = True) -> str | None:
    """The verdict of a free-text reply: None when it names neither idea, UNCLEAR when hedged or both."""
    text = _expand(text)
    sentences = [s for s in re.split(r"(?<=[.!?;\n])", text) if s.strip() and not s.strip().endswith("?")]
    text = " ".join(sentences)  # a question the judge echoes ("does it need reasoning?") is no verdict
    if hedges_count and (_HEDGES & set(re.findall(r"[a-z]+", text)) or any(p in text for p in _HEDGE_PHRASES)):
        return UNCLEAR
    found = set()
    for sentence in sentences:
        words = re.findall(r"[a-z]+", sentence)
        if len(words) == 1 and words[0] in ("yes", "no"):
            found.add(_ONE_WORD[words[0]])
        for clause in re.split(r",|\b(?:but|however|although|though|whereas|yet)\b", sentence):
            found.update(_signals(re.findall(r"[a-z]+", clause)))
    if not found:
        return None
    return found.pop() if len(found) == 1 else UNCLEAR


def parse_verdict(text: str) -> str:
    """'think', 'no_think' or 'unclear' from a difficulty judge's reply (its final answer only).

    The judge is asked for one word, REASONING or DIRECT: a reply that starts with such a word (yes / no and
    the mode names count too; "Answer: DIRECT", "**Reasoning**.") gives that verdict unless the rest of the
    reply says the opposite. Otherwise the reply is read as free text, negations applied: "It doesn't need
    reasoning", "not reasoning", "no need for step-by-step reasoning" and "I think it is direct" are
    no_think, "cannot be answered directly" is think. A hedged reply ("maybe", "probably", "not sure"), one
    that names both, one that names neither, and a truncated one are 'unclear': never guessed.
    """
    answer = extract_answer(text)
    if answer is None:
        return UNCLEAR
    answer = _clean(answer)
    first = _FIRST_WORD.match(answer)
    if first:
        verdict = _ONE_WORD[first.group(1)]
        rest = _free_text_verdict(answer[first.end():], hedges_count=False)
        return UNCLEAR if rest not in (None, UNCLEAR, verdict) else verdict
    return _free_text_verdict(answer) or UNCLEAR


def is_verifiable(record: Record) -> bool:
    kind = record.answer_type or (infer_answer_type(record.answer) if record.answer else None)
    return kind in VERIFIABLE_TYPES


def image_key(record: Record) -> str:
    """A hash of the record's image contents (paths and bytes alike)."""
    from bimode.data.records import png_bytes

    digest = hashlib.sha256()
    for img in record.images:
        try:
            digest.update(png_bytes(img) if not isinstance(img, str) else open(img, "rb").read())
        except OSError:
            digest.update(str(img).encode())
    return digest.hexdigest()


def find_duplicates(records: list[Record], threshold: float = 0.9) -> dict[str, str]:
    """{duplicate id: id of the first record it repeats}: same images and the same normalised question,
    or word-trigram Jaccard similarity >= threshold with one before it (same images; found by MinHash LSH and
    checked exactly: bimode.curate.dedup)."""
    from bimode.curate.dedup import DuplicateFinder

    finder = DuplicateFinder(threshold)
    found = {record.id: finder.check(record.id, image_key(record), record.question) for record in records}
    return {rid: first for rid, first in found.items() if first is not None}


def blocked_keyword(trace: str, keywords=DEFAULT_BLOCKED_KEYWORDS) -> str | None:
    low = trace.lower()
    return next((k for k in keywords if k.lower() in low), None)
