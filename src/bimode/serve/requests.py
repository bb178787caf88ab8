"""Turning an OpenAI chat request into a Prompt and SamplingParams, with 4xx errors that say what is wrong."""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from bimode.generation.defaults import PAPER_MAX_NEW_TOKENS
from bimode.generation.types import Prompt, SamplingParams
from bimode.modes import ThinkingMode


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class ServerLimits:
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int = 32768
    max_new_tokens: int = 32768  # the most a request may ask for (R-4B's own client example asks 16,384)
    # what a request without max_tokens gets (harnesses often send none); None: the model's generation
    # config, else 8,192, within max_new_tokens (resolve_limits, bimode.generation.defaults)
    default_new_tokens: int | None = None
    max_n: int = 16
    allow_image_dir: Path | None = None  # local image paths are refused unless under this directory
    # http(s) image URLs: refused unless allowed (fetching lets any client make the server open URLs)
    allow_remote_images: bool = False
    remote_image_max_bytes: int = 20 * 1024 * 1024
    remote_image_timeout_s: float = 10.0  # the whole fetch, redirects and body included
    remote_image_max_redirects: int = 3
    # applied under every request's own chat_template_kwargs (vLLM's --default-chat-template-kwargs)
    default_chat_template_kwargs: dict = field(default_factory=dict)
    # auto mode thinks iff p_think >= this when a request sets no think_threshold (`bimode eval calibrate`)
    default_think_threshold: float | None = None


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
    cap, seconds = limits.remote_image_max_bytes, limits.remote_image_timeout_s

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
    """OpenAI messages -> our template's messages and the images in placeholder order."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out, images = [], []
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
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url" and isinstance(part.get("image_url"), (dict, str)):
                    url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                    images.append(_decode_image(url, limits, pwhere))
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


def parse_request(body: Any, limits: ServerLimits) -> tuple[Prompt, SamplingParams, bool, dict]:
    """(prompt, params, stream, extras) from a /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages, images = parse_messages(body.get("messages"), limits)
    own = body.get("chat_template_kwargs") or {}
    if not isinstance(own, dict):
        raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs")
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
                      min(limits.default_new_tokens or PAPER_MAX_NEW_TOKENS, limits.max_new_tokens), 1,
                      limits.max_new_tokens)
    budget = _budget(body, kwargs)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", float, 0.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 1e-6, 1.0),
        top_k=max(0, _number(body, "top_k", int, 0, -1, 10**6)),
        seed=_number(body, "seed", int, None),
        max_thinking_tokens=_number({"max_thinking_tokens": budget}, "max_thinking_tokens", int, None, 0,
                                    limits.max_new_tokens),
        think_threshold=_number(body, "think_threshold", float, limits.default_think_threshold, 0.0, 1.0),
    )
    prompt = Prompt(messages=messages, images=images, modes=[mode] * n)
    return prompt, params, stream, {"include_usage": bool(stream_options.get("include_usage"))}
