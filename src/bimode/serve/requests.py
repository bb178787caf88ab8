"""Turning an OpenAI chat request into a Prompt and SamplingParams, with 4xx errors that say what is wrong.

Every field of a request is either honoured or refused with a 400 naming it: a client that relies on a field
bimode does not implement (tools, response_format, penalties, stop strings, ...) must learn so instead of getting
another contract than it asked for. Fields clients send by default with a value that asks for nothing (a zero
penalty, `"tools": []`, `"response_format": {"type": "text"}`) are accepted. A model name the server does not
serve is a 404 `model_not_found`, as vLLM and OpenAI answer. Images are decoded by serve/images.py, within the
limits of serve/limits.py.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from bimode.generation.defaults import PAPER_MAX_NEW_TOKENS
from bimode.generation.types import MAX_TOP_LOGPROBS, Prompt, SamplingParams
from bimode.modes import ThinkingMode
from bimode.serve.errors import BadRequest
from bimode.serve.images import decode_image
from bimode.serve.limits import ServerLimits


def parse_messages(messages: Any, limits: ServerLimits) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI messages -> our template's messages and the images in placeholder order.

    The structure and the prompt's least possible length are checked before any image is decoded: a prompt whose
    text alone (at `limits.max_token_chars` characters a token at most) and images cannot fit
    `limits.max_model_len` is refused without tokenizing it or decoding its images."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out, pending, chars = [], [], 0  # pending: (where, url) of each image, in order
    for i, message in enumerate(messages):
        entry, text_chars = _parse_message(message, f"messages[{i}]", pending)
        out.append(entry)
        chars += text_chars
    _check_least_length(chars, len(pending), limits)
    images = [decode_image(url, limits, where) for where, url in pending]
    return out, images


def _parse_message(message: Any, where: str, pending: list) -> tuple[dict, int]:
    """One message as our template reads it, and its characters of text; its images' URLs go to `pending`."""
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object", where)
    role = message.get("role")
    if role not in ("system", "user", "assistant"):
        raise BadRequest(f"{where}.role must be system, user or assistant, not {role!r}", f"{where}.role")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        entry, chars = {"role": role, "content": content}, len(content)
    elif isinstance(content, list):
        parts, chars = _parse_parts(content, where, pending)
        entry = {"role": role, "content": parts}
    else:
        raise BadRequest(f"{where}.content must be a string or a list of parts", f"{where}.content")
    reasoning = message.get("reasoning_content", message.get("reasoning"))  # old and new vLLM names
    if role == "assistant" and isinstance(reasoning, str):
        entry["reasoning_content"] = reasoning  # the template leaves past reasoning out of the prompt
    return entry, chars


def _parse_parts(content: list, where: str, pending: list) -> tuple[list[dict], int]:
    """A message's text and image parts (an image becomes a placeholder), and their characters of text."""
    parts, chars = [], 0
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        image = part.get("image_url") if kind == "image_url" else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
            chars += len(part["text"])
        elif isinstance(image, (dict, str)):
            pending.append((pwhere, image.get("url") if isinstance(image, dict) else image))
            parts.append({"type": "image"})
        else:
            raise BadRequest(f"{pwhere} must be a text or image_url part", pwhere)
    return parts, chars


def _check_least_length(chars: int, images: int, limits: ServerLimits) -> None:
    least = -(-chars // limits.max_token_chars) if limits.max_token_chars else 0
    least += images * limits.image_tokens
    if limits.max_model_len is not None and least > limits.max_model_len:
        raise BadRequest(f"the prompt has at least {least} tokens ({chars} characters of text, {images} "
                         f"images), over the limit of {limits.max_model_len}", "messages")


def _number(body: dict, name: str, kind, default, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"{name} must be {'a number' if kind is float else 'an integer'}", name)
    if low is not None and value < low or high is not None and value > high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}", name)
    return kind(value)


# Model-name suffixes that force a mode, for clients that send only model, messages and max_tokens
# (VLMEvalKit's and lmms-eval's OpenAI clients): `tiny:no_think`, `tiny:think`, `tiny:auto`.
MODEL_MODES = {f":{m.value}": m for m in ThinkingMode}
# the thinking budget's names: ours, vLLM's (`thinking_token_budget`) and SGLang templates' (`thinking_budget`)
BUDGET_NAMES = ("max_thinking_tokens", "thinking_token_budget", "thinking_budget")


def split_model_name(name: Any) -> tuple[str, ThinkingMode | None]:
    """(base name, forced mode or None) of a request's `model`: `tiny:think` -> ("tiny", THINK)."""
    if isinstance(name, str):
        for suffix, mode in MODEL_MODES.items():
            if name.endswith(suffix):
                return name[: -len(suffix)], mode
    return name, None


def _budget(body: dict, kwargs: dict) -> Any:
    given = {name: source[name] for source in (body, kwargs) for name in BUDGET_NAMES if source.get(name) is not None}
    if len({v if isinstance(v, (int, float)) and not isinstance(v, bool) else repr(v) for v in given.values()}) > 1:
        raise BadRequest(f"conflicting thinking budgets: {given}", "max_thinking_tokens")
    return next(iter(given.values()), None)


# What bimode serve acts on. `user` is a label for the caller's own tracking; nothing to act on, nothing ignored.
HONOURED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
                      "n", "stream", "stream_options", "seed", "logprobs", "top_logprobs", "chat_template_kwargs",
                      "think_threshold", "user", *BUDGET_NAMES})
# Fields bimode does not implement, accepted with a value that asks for nothing (clients send these by default).
# None (JSON null) always asks for nothing.
NEUTRAL = {"presence_penalty": [0], "frequency_penalty": [0], "repetition_penalty": [1], "min_p": [0],
           "logit_bias": [{}], "stop": [[], ""], "tools": [[]], "functions": [[]], "tool_choice": ["none"],
           "function_call": ["none"], "parallel_tool_calls": [True, False], "response_format": [{"type": "text"}],
           "store": [False], "metadata": [{}], "echo": [False], "ignore_eos": [False], "min_tokens": [0],
           "skip_special_tokens": [True], "include_stop_str_in_output": [False], "best_of": [1],
           "vllm_xargs": [{}], "modalities": [["text"]]}
SEEDS = (-(2**63), 2**64 - 1)  # what torch's generator takes (vLLM and OpenAI clients may send -1)
# chat_template_kwargs bimode reads: the mode and the budget; the template gets nothing else
TEMPLATE_KWARGS = frozenset({"thinking_mode", "enable_thinking", *BUDGET_NAMES})


def _asks_nothing(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):  # JSON false is not the number 0
        return value is neutral
    return value == neutral


def check_fields(body: dict) -> None:
    """Refuse, naming it, the first field bimode would otherwise ignore."""
    for name, value in body.items():
        if name in HONOURED or value is None:
            continue
        if name in NEUTRAL:
            if any(_asks_nothing(value, neutral) for neutral in NEUTRAL[name]):
                continue
            raise BadRequest(f"{name} is not supported by bimode serve (only {NEUTRAL[name][0]!r} or null, which "
                             "ask for nothing); leave it out", name)
        raise BadRequest(f"{name} is not supported by bimode serve; leave it out", name)


def check_model(requested: Any, served: str | None) -> None:
    """A model name the server does not serve is a 404 (NAME, NAME:auto, NAME:think, NAME:no_think are served)."""
    if requested is not None and not isinstance(requested, str):
        raise BadRequest("model must be a string", "model")
    if served is None or requested is None:
        return
    base, _ = split_model_name(requested)
    if base != served:
        raise BadRequest(f"the model {requested!r} does not exist here: this server serves {served!r} (and "
                         f"{served}:auto, {served}:think, {served}:no_think)", "model", status=404,
                         code="model_not_found")


def parse_request(body: Any, limits: ServerLimits, served_model: str | None = None
                  ) -> tuple[Prompt, SamplingParams, bool, dict]:
    """(prompt, params, stream, extras) from a /v1/chat/completions body; `served_model`: the name requests may
    ask for (None: any). The checks run in a fixed order, so a request with several errors learns the same one
    first every time."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_model(body.get("model"), served_model)
    check_fields(body)
    messages, images = parse_messages(body.get("messages"), limits)
    kwargs = _template_kwargs(body, limits)
    mode = _thinking_mode(kwargs)
    n = _number(body, "n", int, 1, 1, limits.max_n)
    max_new = _max_new_tokens(body, limits)
    budget = _budget(body, kwargs)
    stream, include_usage = _streaming(body)
    logprobs, top_logprobs = _logprobs(body)
    _check_available(limits, logprobs, budget)
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", float, 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 1e-6, 1.0),
        top_k=max(0, _number(body, "top_k", int, 0, -1, 10**6)),
        seed=_number(body, "seed", int, None, *SEEDS),
        max_thinking_tokens=_number({"max_thinking_tokens": budget}, "max_thinking_tokens", int, None, 0,
                                    limits.max_tokens),
        think_threshold=_number(body, "think_threshold", float, limits.think_threshold, 0.0, 1.0),
        logprobs=logprobs, top_logprobs=top_logprobs,
    )
    prompt = Prompt(messages=messages, images=images, modes=[mode] * n)
    return prompt, params, stream, {"include_usage": include_usage}


def _template_kwargs(body: dict, limits: ServerLimits) -> dict:
    """The chat_template_kwargs the request gets: its own (with the mode its model name forces) over the server's
    defaults; its own mode and budget replace the defaults', whatever name either uses."""
    own = body.get("chat_template_kwargs") or {}
    if not isinstance(own, dict):
        raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
    unread = sorted(k for k, v in own.items() if k not in TEMPLATE_KWARGS and v is not None)
    if unread:
        raise BadRequest(f"chat_template_kwargs.{unread[0]} is not read by bimode's chat template (it reads "
                         f"{', '.join(sorted(TEMPLATE_KWARGS))}); leave it out", f"chat_template_kwargs.{unread[0]}")
    _, model_mode = split_model_name(body.get("model"))
    if model_mode is not None:
        if any(own.get(k) is not None for k in ("thinking_mode", "enable_thinking")):
            raise BadRequest(f"model {body.get('model')!r} forces {model_mode.value} mode: leave out "
                             "chat_template_kwargs.thinking_mode / enable_thinking", "model")
        own = {**own, "thinking_mode": model_mode.value}
    replaced = set()
    if "thinking_mode" in own or "enable_thinking" in own:
        replaced |= {"thinking_mode", "enable_thinking"}
    if any(source.get(name) is not None for source in (body, own) for name in BUDGET_NAMES):
        replaced |= set(BUDGET_NAMES)
    defaults = {k: v for k, v in limits.default_chat_template_kwargs.items() if k not in replaced}
    return {**defaults, **own}


def _thinking_mode(kwargs: dict) -> ThinkingMode:
    enable = kwargs.get("enable_thinking")
    if enable is not None and not isinstance(enable, bool):
        raise BadRequest("chat_template_kwargs.enable_thinking must be a boolean", "chat_template_kwargs")
    try:
        return ThinkingMode.parse(kwargs.get("thinking_mode"), enable_thinking=enable)
    except ValueError as exc:
        raise BadRequest(str(exc), "chat_template_kwargs.thinking_mode") from None


def _max_new_tokens(body: dict, limits: ServerLimits) -> int:
    """max_completion_tokens (OpenAI's newer name) else max_tokens, else the server's default, within its cap."""
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    return _number({"max_tokens": max_tokens}, "max_tokens", int,
                   min(limits.default_new_tokens or PAPER_MAX_NEW_TOKENS, limits.max_tokens), 1, limits.max_tokens)


def _streaming(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) of a request."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    return stream, bool(stream_options.get("include_usage"))


def _logprobs(body: dict) -> tuple[bool, int]:
    """(logprobs, top_logprobs) of a request."""
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise BadRequest("logprobs must be a boolean", "logprobs")
    top_logprobs = _number(body, "top_logprobs", int, 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return logprobs, top_logprobs


def _check_available(limits: ServerLimits, logprobs: bool, budget: Any) -> None:
    """Log-probs and a thinking budget need an engine that shares prefixes."""
    if not limits.shared_prefix:
        asked = "logprobs" if logprobs else "max_thinking_tokens" if budget is not None else None
        if asked:
            raise BadRequest(f"{asked} is not available for this model: it runs through transformers' generate "
                             "(multi-axis rotary positions of a family other than Qwen-VL)", asked)
