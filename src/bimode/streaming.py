"""Splitting a response into reasoning and answer, all at once or as it streams (docs/tokens.md).

`split_reasoning` is the definition, `ReasoningSplitter` the same split computed incrementally: fed the mode's
forced prompt suffix and then the generated text in any pieces, the deltas it returns add up to exactly
`split_reasoning` of the whole response. `bimode serve` (streamed and not) and `bimode chat` use these two,
so a streamed answer and a non-streamed one of the same tokens never disagree. `IncrementalDecoder` turns
token ids into those text pieces.

The split (every mode's prompt suffix starts with `<think>`, so a response starts inside its think block):
- a leading `<think>` is the block's opening tag; the block ends at the first `</think>` after it, whether the
  prompt suffix holds it (no_think mode) or the model wrote it;
- reasoning = the text inside the block, content = the text after its `</think>`, both stripped of
  surrounding whitespace; tags written later are content text, never a second block;
- no `</think>` at all (cut off while thinking): everything is reasoning and the content is empty.

Why the first `</think>` and not the last (as `bimode.modes.parse_response`, the scoring parser, takes it):
a split that a later token can revise cannot be streamed, since text already sent as content would have to
move to reasoning. For a well-formed response (one block, no tags in the answer) the two agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from bimode.modes import THINK_CLOSE, THINK_OPEN


@dataclass(frozen=True)
class ResponseSplit:
    reasoning: str
    content: str
    closed: bool  # the think block was closed (by the forced suffix or by the model)

    @property
    def mode(self) -> str:
        """`think` (closed, with reasoning), `no_think` (closed, empty) or `malformed` (never closed)."""
        if not self.closed:
            return "malformed"
        return "think" if self.reasoning else "no_think"


def split_reasoning(response: str) -> ResponseSplit:
    """Reasoning and content of a response (the mode's prompt suffix followed by the generated text)."""
    body = response[len(THINK_OPEN):] if response.startswith(THINK_OPEN) else response
    reasoning, close, content = body.partition(THINK_CLOSE)
    return ResponseSplit(reasoning.strip(), content.strip(), bool(close))


@dataclass(frozen=True)
class Delta:
    """What one piece of text added: reasoning first, then content (a piece may close the block)."""

    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


class ReasoningSplitter:
    """`split_reasoning`, incrementally. Feed the prompt suffix of the mode, then generated text pieces;
    `finish()` at the end. Concatenated, the returned deltas equal `split_reasoning(suffix + text)`.

    Text is held back only while it is undecided: a possible start of `</think>` at the end of the reasoning,
    and trailing whitespace (stripped if nothing follows it). Pure: no tokenizer, no I/O.
    """

    _START, _REASONING, _CONTENT, _DONE = range(4)

    def __init__(self):
        self._state = self._START
        self._pending = ""  # received, not yet sent
        self._started = False  # the current part (reasoning or content) has sent text
        self.reasoning = ""  # everything sent so far
        self.content = ""
        self.closed = False

    def feed(self, piece: str) -> Delta:
        if self._state == self._DONE:
            raise RuntimeError("feed() after finish()")
        self._pending += piece
        if self._state == self._START:
            if self._pending.startswith(THINK_OPEN):
                self._pending = self._pending[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(self._pending):
                return Delta()  # may still become the opening tag
            self._state = self._REASONING
        return self._advance(final=False)

    def finish(self) -> Delta:
        """The rest: held text that turned out final (trailing whitespace is dropped)."""
        if self._state == self._DONE:
            return Delta()
        if self._state == self._START:
            self._state = self._REASONING  # a cut-off `<think` is reasoning text, as split_reasoning says
        delta = self._advance(final=True)
        self._state = self._DONE
        return delta

    @property
    def split(self) -> ResponseSplit:
        """What has been sent so far, as a ResponseSplit (the whole split once finished)."""
        return ResponseSplit(self.reasoning, self.content, self.closed)

    def _advance(self, final: bool) -> Delta:
        reasoning = ""
        if self._state == self._REASONING:
            index = self._pending.find(THINK_CLOSE)
            if index >= 0:
                rest = self._pending[index + len(THINK_CLOSE):]
                reasoning = self._part(self._pending[:index], "", final=True)
                self._pending = rest
                self._state, self._started, self.closed = self._CONTENT, False, True
            else:
                hold = 0 if final else _partial_tag(self._pending)
                text, tail = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
                return self._record(self._part(text, tail, final), "")
        content = self._part(self._pending, "", final) if self._state == self._CONTENT else ""
        return self._record(reasoning, content)

    def _part(self, text: str, tail: str, final: bool) -> str:
        """Send `text` but for its trailing whitespace (and `tail`), which wait in `_pending` unless final."""
        if not self._started:
            text = text.lstrip()
        out = text.rstrip()
        self._pending = "" if final else text[len(out):] + tail
        self._started = self._started or bool(out)
        return out

    def _record(self, reasoning: str, content: str) -> Delta:
        self.reasoning += reasoning
        self.content += content
        return Delta(reasoning, content)


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that is a proper start of `</think>`."""
    for k in range(min(len(THINK_CLOSE) - 1, len(text)), 0, -1):
        if text.endswith(THINK_CLOSE[:k]):
            return k
    return 0


class IncrementalDecoder:
    """Token ids -> text pieces whose concatenation is `tokenizer.decode(all ids)`.

    A piece is sent only when the decoded text does not end in an incomplete character (U+FFFD: the rest of
    its bytes may still come). Each step decodes a short window that starts one piece back (context for
    tokenizers that drop a leading space), not everything so far. `finish(full_text)` sends what remains of
    the final text (the completion's text); it sends nothing if the pieces sent are not a prefix of it, which
    does not happen with byte-level BPE tokenizers (Qwen's, the tiny model's).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # ids[:_read] have been sent as text
        self.text = ""  # sent so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        sent = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if len(window) <= len(sent) or window.endswith("\ufffd") or not window.startswith(sent):
            return ""
        piece = window[len(sent):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def finish(self, full_text: str | None = None) -> str:
        if full_text is None:
            full_text = self._decode(self.ids)
        if not full_text.startswith(self.text):
            return ""
        piece = full_text[len(self.text):]
        self.text = full_text
        return piece


class ResponseStream:
    """One streamed response: token ids in, reasoning/content deltas out (IncrementalDecoder + ReasoningSplitter).

    `suffix` is the mode's forced prompt suffix; None where it is not known while tokens come (auto mode with a
    think threshold: the engine picks the suffix), and then nothing is sent before `finish`. `finish` takes the
    completion's suffix and text, so the deltas add up to `split_reasoning(completion.response)` exactly.
    """

    def __init__(self, tokenizer, suffix: str | None):
        self.decoder = IncrementalDecoder(tokenizer)
        self.splitter = ReasoningSplitter()
        self.suffix = suffix
        self._first = suffix or ""  # fed with the first piece

    def add(self, token_id: int) -> Delta:
        piece = self.decoder.add(token_id)
        if self.suffix is None or not (piece or self._first):
            return Delta()
        piece, self._first = self._first + piece, ""
        return self.splitter.feed(piece)

    def finish(self, suffix: str, text: str) -> Delta:
        if self.suffix is None:  # the whole response now
            self.decoder.finish(text)
            head = self.splitter.feed(suffix + text)
        else:
            head = self.splitter.feed(self._first + self.decoder.finish(text))
            self._first = ""
        tail = self.splitter.finish()
        return Delta(head.reasoning + tail.reasoning, head.content + tail.content)
