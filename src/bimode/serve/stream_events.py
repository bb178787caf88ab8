"""A streamed chat completion's server-sent events, in OpenAI's `chat.completion.chunk` shape (as vLLM sends them).

Each sample's text goes through its own ResponseStream, which splits reasoning from the answer as tokens come, so a
streamed answer and a plain one agree for the same tokens. A token's log-prob entry waits for the chunk that
brings its text.
"""

from __future__ import annotations

import json

from bimode.generation.types import Completion, TokenLogprob
from bimode.modes import ThinkingMode
from bimode.serve import responses
from bimode.serve.batcher import Job
from bimode.streaming import ResponseStream

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class StreamEvents:
    """The events of one streamed request (`job`), with `request_id` and `created` in each chunk."""

    def __init__(self, tokenizer, model_name: str, request_id: str, created: int, job: Job):
        self.tokenizer, self.model_name, self.request_id, self.created = tokenizer, model_name, request_id, created
        self.logprobs = job.params.logprobs
        # With a think threshold the engine picks an auto sample's mode suffix itself: known only at the end.
        chosen = job.params.think_threshold is not None
        self.texts = [ResponseStream(tokenizer, None if chosen and m is ThinkingMode.AUTO else m.prompt_suffix)
                      for m in job.prompt.modes]
        self.unsent = [[] for _ in job.prompt.modes]  # log-prob entries of tokens whose text is not out yet

    def opening(self) -> list[str]:
        """Each sample's first chunk: the assistant's role."""
        return [self.chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.texts))]

    def token(self, index: int, token: int, logprob: TokenLogprob | None) -> str | None:
        """The chunk a generated token brings; None while its text is held back (part of a tag or character)."""
        if logprob is not None and self.logprobs:
            self.unsent[index].append(responses.logprob_entry(self.tokenizer, token, logprob))
        delta = responses.delta(self.texts[index].add(token))
        return self.chunk(index, delta) if delta else None

    def finish(self, index: int, completion: Completion) -> str:
        """A sample's last chunk: what is left (held-back text, a cut-off character), its finish reason and, as
        in a plain response, its `bimode` field (the mode taken, p_think; the chat page shows them)."""
        rest = self.texts[index].finish(completion.prompt_suffix, completion.text)
        return self.chunk(index, responses.delta(rest), responses.finish_reason(completion),
                          responses.decision(completion))

    def chunk(self, index: int, delta: dict, finish: str | None = None, decision: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if decision is not None:
            choice["bimode"] = decision
        if self.logprobs:  # the entries of the tokens this chunk brings (none: null, as vLLM sends)
            choice["logprobs"] = {"content": self.unsent[index]} if self.unsent[index] else None
            self.unsent[index] = []
        return sse({"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model_name, "choices": [choice]})

    def usage(self, usage: dict) -> str:
        """The chunk with no choices that carries the usage (`stream_options.include_usage`)."""
        return sse({"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model_name, "choices": [], "usage": usage})

    @staticmethod
    def failure(status: int, message: str) -> str:
        """An error event, then the end of the stream (as vLLM)."""
        return sse({"error": {"message": message, "code": status}}) + DONE
