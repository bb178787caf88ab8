"""`bimode chat`: one-shot or interactive chat with streamed output, reasoning shown apart from the answer."""

from __future__ import annotations

import sys

from bimode.generation.types import Prompt, SamplingParams
from bimode.modes import THINK_CLOSE, ThinkingMode

DIM, RESET = "\033[2m", "\033[0m"


class StreamPrinter:
    """Prints a response as it streams: reasoning dimmed under [thinking], then [answer]."""

    def __init__(self, tokenizer, mode: ThinkingMode, out=sys.stdout, color: bool = True):
        self.tokenizer, self.out = tokenizer, out
        self.dim, self.reset = (DIM, RESET) if color else ("", "")
        self.ids: list[int] = []
        self.prefix = mode.prompt_suffix.removeprefix("<think>")
        self.shown = {"thinking": "", "answer": ""}

    def _pieces(self, text: str) -> dict:
        if THINK_CLOSE in text:
            reasoning, _, answer = text.partition(THINK_CLOSE)
            return {"thinking": reasoning.strip(), "answer": answer.lstrip()}
        return {"thinking": text.lstrip().rstrip("\n"), "answer": ""}

    def __call__(self, prompt_index: int, sample_index: int, token: int) -> None:
        self.ids.append(token)
        self.write(self.prefix + self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def write(self, text: str) -> None:
        if text.endswith("\ufffd"):
            return  # wait for the rest of a multi-byte character
        for part, piece in self._pieces(text).items():
            old = self.shown[part]
            if len(piece) > len(old) and piece.startswith(old):
                if not old:
                    header = f"[thinking] {self.dim}" if part == "thinking" else (
                        f"{self.reset}\n[answer] " if self.shown["thinking"] else "[answer] ")
                    self.out.write(header)
                self.out.write(piece[len(old):])
                self.shown[part] = piece
        self.out.flush()


def chat_once(engine, messages, images, mode: ThinkingMode, params: SamplingParams, out=sys.stdout,
              color: bool = True):
    printer = StreamPrinter(engine.tokenizer, mode, out, color)
    completion = engine.generate([Prompt(messages=messages, images=images, modes=[mode])], params,
                                 on_token=printer)[0][0]
    printer.write(completion.response.removeprefix("<think>"))  # text the budget forced in, if any
    out.write(f"{printer.reset}\n")
    parsed = completion.parsed
    out.write(f"[{parsed.mode}; {completion.thinking_tokens} thinking + {completion.answer_tokens} answer tokens;"
              f" p_think={completion.p_think:.2f}; finish={completion.finish_reason}]\n")
    return completion


def run_chat(model_path: str, prompt: str | None, image_paths: list[str], mode: str, budget: int | None,
             max_new_tokens: int, temperature: float, threshold: float | None, trust_remote_code: bool) -> int:
    from bimode.data.records import to_pil
    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model

    images = [to_pil(p) for p in image_paths]
    model, processor = load_model(model_path, trust_remote_code=trust_remote_code)
    engine = TransformersEngine(model, processor)
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
        history.append({"role": "assistant", "content": completion.parsed.answer})
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
