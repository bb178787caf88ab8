"""`bimode chat`: one-shot or interactive chat with streamed output, reasoning shown apart from the answer."""

from __future__ import annotations

import sys

from bimode.generation.types import Prompt, SamplingParams
from bimode.modes import ThinkingMode
from bimode.streaming import Delta, ResponseStream

DIM, RESET = "\033[2m", "\033[0m"


class StreamPrinter:
    """Prints a response as it streams: reasoning dimmed under [thinking], then [answer].

    The split is bimode.streaming's, as `bimode serve` sends it: what is printed is the completion's
    split_reasoning. `suffix`: the mode's prompt suffix, None where the engine picks it (auto mode with a
    think threshold), and then the response is printed when it is complete.
    """

    def __init__(self, tokenizer, suffix: str | None, out=None, color: bool = True):
        self.out = out or sys.stdout  # looked up per call: a default bound at import would miss a redirect
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        self.stream = ResponseStream(tokenizer, suffix)
        self.shown = {"thinking": False, "answer": False}

    def __call__(self, prompt_index: int, sample_index: int, token: int, logprob=None) -> None:
        self.write(self.stream.add(token))

    def finish(self, completion) -> None:
        self.write(self.stream.finish(completion.prompt_suffix, completion.text))
        self.out.write(f"{self.reset}\n")

    def write(self, delta: Delta) -> None:
        if delta.reasoning:
            if not self.shown["thinking"]:
                self.out.write(f"[thinking] {self.dim}")
                self.shown["thinking"] = True
            self.out.write(delta.reasoning)
        if delta.content:
            if not self.shown["answer"]:
                self.out.write(f"{self.reset}\n[answer] " if self.shown["thinking"] else "[answer] ")
                self.shown["answer"] = True
            self.out.write(delta.content)
        self.out.flush()


def chat_once(engine, messages, images, mode: ThinkingMode, params: SamplingParams, out=None,
              color: bool = True):
    out = out or sys.stdout
    chosen = mode is ThinkingMode.AUTO and params.think_threshold is not None  # the engine picks the suffix
    printer = StreamPrinter(engine.tokenizer, None if chosen else mode.prompt_suffix, out, color)
    completion = engine.generate([Prompt(messages=messages, images=images, modes=[mode])], params,
                                 on_token=printer)[0][0]
    printer.finish(completion)
    split = completion.split
    out.write(f"[{split.mode}; {completion.thinking_tokens} thinking + {completion.answer_tokens} other tokens;"
              f" p_think={completion.p_think:.2f}; finish={completion.finish_reason}]\n")
    return completion


def run_chat(model_path: str, prompt: str | None, image_paths: list[str], mode: str, budget: int | None,
             max_new_tokens: int, temperature: float, threshold: float | None, trust_remote_code: bool) -> int:
    from bimode.data.records import to_pil
    from bimode.generation.backends import local_engine

    images = [to_pil(p) for p in image_paths]
    engine = local_engine(model_path, trust_remote_code=trust_remote_code)
    mode_ = ThinkingMode.parse(mode)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, max_thinking_tokens=budget,
                            think_threshold=threshold)
    color = sys.stdout.isatty()
    history: list[dict] = []
    pending_images = images

    def turn(text: str) -> None:
        nonlocal pending_images
        content = [{"type": "image"} for _ in pending_images] + [{"type": "text", "text": text}]
        history.append({"role": "user", "content": content})
        completion = chat_once(engine, history, images, mode_, params, color=color)
        history.append({"role": "assistant", "content": completion.split.content})
        pending_images = []

    if prompt is not None:
        turn(prompt)
        return 0
    print(f"bimode chat ({mode_.value} mode). Empty line or Ctrl-D quits.")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        turn(text)
    return 0
