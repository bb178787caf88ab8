"""Turning an OpenAI chat request into a Prompt and SamplingParams, with 4xx errors that say what is wrong.

Every field of a request is either honoured or refused with a 400 naming it: a client that relies on a field
bimode does not implement (tools, response_format, penalties, stop strings, ...) must learn so instead of getting
another contract than it asked for. Fields clients send by default with a value that asks for nothing (a zero
penalty, `"tools": []`, `"response_format": {"type": "text"}`) are accepted. A model name the server does not
serve is a 404 `model_not_found`, as vLLM and OpenAI answer.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from bimode.generation.defaults import PAPER_MAX_NEW_TOKENS
from bimode.generation.types import MAX_TOP_LOGPROBS, Prompt, SamplingParams
from bimode.modes import ThinkingMode


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


# A request body's default cap: room for two images at ServerLimits' 10 MiB image limit, base64-encoded (4/3 as
# large), and 4 MiB of text beside them.
DEFAULT_MAX_REQUEST_BYTES = 2 * (10 * 1024 * 1024 * 4 // 3) + 4 * 1024 * 1024


@dataclass
class ServerLimits:
    """What the server allows, built once from `bimode serve`'s config (`from_config`); the fields that are
    flags have the flags' names."""

    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_model_len: int | None = None  # most prompt tokens; None: the engine's context length, else 32,768
    # the most characters one token of the tokenizer decodes to: a prompt of C characters has at least
    # C / max_token_chars tokens, so one far over the limit is refused without tokenizing it (set by the app)
    max_token_chars: int | None = None
    image_tokens: int = 0  # prompt tokens one image takes (set by the app from the engine)
    max_tokens: int = 32768  # the most new tokens a request may ask for (R-4B's own client example asks 16,384)
    # what a request without max_tokens gets (harnesses often send none); None: the model's generation
    # config, else 8,192, within max_tokens (resolve_limits, bimode.generation.defaults)
    default_new_tokens: int | None = None
    max_n: int = 16
    allow_image_dir: Path | None = None  # local image paths are refused unless under this directory
    # http(s) image URLs: refused unless allowed (fetching lets any client make the server open URLs)
    allow_remote_images: bool = False
    remote_image_max_bytes: int = 20 * 1024 * 1024
    remote_image_timeout: float = 10.0  # seconds for the whole fetch, redirects and body included
    remote_image_max_redirects: int = 3
    # applied under every request's own chat_template_kwargs (vLLM's --default-chat-template-kwargs)
    default_chat_template_kwargs: dict = field(default_factory=dict)
    # auto mode thinks iff p_think >= this when a request sets no think_threshold (`bimode eval calibrate`)
    think_threshold: float | None = None
    # False for models the engine runs through `model.generate` (Qwen-VL's multi-axis positions): no thinking
    # budget and no log-probs there, so requests for them are refused
    shared_prefix: bool = True
    max_batch: int = 32  # most samples generated together
    request_timeout: float = 300.0  # seconds from a request's arrival until it fails (504)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413 before they are parsed
    max_queued_requests: int = 64  # more requests waiting for the engine get 503 with Retry-After

    @classmethod
    def from_config(cls, cfg) -> ServerLimits:
        """The limits a `bimode serve` config (ServeConfig) sets: every field of both, by name."""
        names = {f.name for f in fields(cls)} & {f.name for f in fields(cfg)}
        values = {name: getattr(cfg, name) for name in names}
        if values.get("allow_image_dir"):
            values["allow_image_dir"] = Path(values["allow_image_dir"])
        values["default_chat_template_kwargs"] = dict(values.get("default_chat_template_kwargs") or {})
        return cls(**values)


def _decode_image(url: Any, limits: ServerLimits, where: str) -> Image.Image:
    label = where  # what decoding errors say the image is: a remote one's URL too
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: image_url.url must be a non-empty string", where)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise BadRequest(f"{where}: data URLs must be base64-encoded", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise BadRequest(f"{where}: image is larger than {limits.max_image_bytes} bytes", where, status=413)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: image data is not valid base64", where) from None
    elif url.startswith(("http://", "https://")):
        raw, content_type = _fetch_remote_image(url, limits, where)
        label = f"{where} ({url}, Content-Type {content_type or 'not given'})"
    elif _SCHEME.match(url) and not url.startswith("file://"):
        raise BadRequest(f"{where}: image URL scheme {url.split(':', 1)[0]!r} is not supported "
                         "(use http, https, data or file)", where)
    else:
        raw = _read_local_image(url.removeprefix("file://"), limits, where)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise BadRequest(f"{label}: image has {image.width}x{image.height} pixels, over the limit",
                                 where, status=413)
            return image.convert("RGB")
    except BadRequest:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object, no help to the caller
        raise BadRequest(f"{label}: cannot decode image: not an image format PIL reads", where) from None
    except Exception as exc:
        raise BadRequest(f"{label}: cannot decode image: {exc}", where) from None


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _fetch_remote_image(url: str, limits: ServerLimits, where: str) -> tuple[bytes, str | None]:
    """The bytes at an http(s) URL and their Content-Type, within the size cap, the redirect limit and one
    deadline for the whole fetch: redirects are followed here, and every hop's network operations get only
    what is left of the deadline (httpx's own timeout is per operation, and a server that trickles bytes
    would otherwise hold the request for ever)."""
    import httpx

    if not limits.allow_remote_images:
        raise BadRequest(f"{where}: remote image URLs are not fetched unless the server runs with "
                         "--allow_remote_images; or send a base64 data URL", where)
    cap, seconds = limits.remote_image_max_bytes, limits.remote_image_timeout

    def fail(reason: str) -> BadRequest:
        return BadRequest(f"{where}: cannot fetch image {url}: {reason}", where)

    deadline = time.monotonic() + seconds

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise fail(f"took longer than {seconds:g} s")
        return left

    current = url
    try:
        with httpx.Client(follow_redirects=False) as client:
            for _ in range(limits.remote_image_max_redirects + 1):
                with client.stream("GET", current, timeout=time_left()) as response:
                    if response.is_redirect:
                        current = str(response.next_request.url) if response.next_request else ""
                        if not current.startswith(("http://", "https://")):
                            raise fail(f"redirected to an unsupported scheme ({current or 'no location'})")
                        continue
                    if response.status_code >= 400:
                        raise fail(f"HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > cap:
                        raise fail(f"{int(declared)} bytes, over the limit of {cap} (--remote-image-max-bytes)")
                    chunks, size = [], 0
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > cap:
                            raise fail(f"over the limit of {cap} bytes (--remote-image-max-bytes)")
                        time_left()
                        chunks.append(chunk)
                    return b"".join(chunks), response.headers.get("content-type")
    except httpx.TimeoutException:
        raise fail(f"took longer than {seconds:g} s") from None
    except httpx.UnsupportedProtocol as exc:
        raise fail(f"redirected to an unsupported scheme ({exc})") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    raise fail(f"more than {limits.remote_image_max_redirects} redirects")


def _read_local_image(path: str, limits: ServerLimits, where: str) -> bytes:
    if limits.allow_image_dir is None:
        raise BadRequest(f"{where}: local image paths are disabled (start the server with --allow_image_dir)", where)
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(limits.allow_image_dir.resolve()):
        raise BadRequest(f"{where}: {path} is outside the allowed image directory", where, status=403)
    if not resolved.is_file():
        raise BadRequest(f"{where}: no such image file {path}", where)
    if resolved.stat().st_size > limits.max_image_bytes:
        raise BadRequest(f"{where}: image is larger than {limits.max_image_bytes} bytes", where, status=413)
    return resolved.read_bytes()


def parse_messages(messages: Any, limits: ServerLimits) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI messages -> our template's messages and the images in placeholder order.

    The structure and the prompt's least possible length are checked before any image is decoded: a prompt whose
    text alone (at `limits.max_token_chars` characters a token at most) and images cannot fit
    `limits.max_model_len` is refused without tokenizing it or decoding its images."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out, pending, chars = [], [], 0  # pending: (parts list, index, url, where) of each image, in order
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise BadRequest(f"{where}.role must be system, user or assistant, not {role!r}", f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            entry = {"role": role, "content": content}
            chars += len(content)
        elif isinstance(content, list):
            parts = []
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
            entry = {"role": role, "content": parts}
        else:
            raise BadRequest(f"{where}.content must be a string or a list of parts", f"{where}.content")
        reasoning = message.get("reasoning_content", message.get("reasoning"))  # old and new vLLM names
        if role == "assistant" and isinstance(reasoning, str):
            entry["reasoning_content"] = reasoning  # the template leaves past reasoning out of the prompt
        out.append(entry)
    least = -(-chars // limits.max_token_chars) if limits.max_token_chars else 0
    least += len(pending) * limits.image_tokens
    if limits.max_model_len is not None and least > limits.max_model_len:
        raise BadRequest(f"the prompt has at least {least} tokens ({chars} characters of text, {len(pending)} "
                         f"images), over the limit of {limits.max_model_len}", "messages")
    images = [_decode_image(url, limits, where) for where, url in pending]
    return out, images


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
    ask for (None: any)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    check_model(body.get("model"), served_model)
    check_fields(body)
    messages, images = parse_messages(body.get("messages"), limits)
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
    # the request's own mode and budget replace the server default's, whatever name either uses
    replaced = set()
    if "thinking_mode" in own or "enable_thinking" in own:
        replaced |= {"thinking_mode", "enable_thinking"}
    if any(source.get(name) is not None for source in (body, own) for name in BUDGET_NAMES):
        replaced |= set(BUDGET_NAMES)
    defaults = {k: v for k, v in limits.default_chat_template_kwargs.items() if k not in replaced}
    kwargs = {**defaults, **own}
    enable = kwargs.get("enable_thinking")
    if enable is not None and not isinstance(enable, bool):
        raise BadRequest("chat_template_kwargs.enable_thinking must be a boolean", "chat_template_kwargs")
    try:
        mode = ThinkingMode.parse(kwargs.get("thinking_mode"), enable_thinking=enable)
    except ValueError as exc:
        raise BadRequest(str(exc), "chat_template_kwargs.thinking_mode") from None
    n = _number(body, "n", int, 1, 1, limits.max_n)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    max_new = _number({"max_tokens": max_tokens}, "max_tokens", int,
                      min(limits.default_new_tokens or PAPER_MAX_NEW_TOKENS, limits.max_tokens), 1,
                      limits.max_tokens)
    budget = _budget(body, kwargs)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise BadRequest("logprobs must be a boolean", "logprobs")
    top_logprobs = _number(body, "top_logprobs", int, 0, 0, MAX_TOP_LOGPROBS)
    if top_logprobs and not logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    if not limits.shared_prefix:
        asked = "logprobs" if logprobs else "max_thinking_tokens" if budget is not None else None
        if asked:
            raise BadRequest(f"{asked} is not available for this model: it runs through transformers' generate "
                             "(multi-axis rotary positions, e.g. Qwen-VL)", asked)
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
    return prompt, params, stream, {"include_usage": bool(stream_options.get("include_usage"))}
