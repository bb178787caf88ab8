"""What one request may cost `bimode serve`: sizes, token counts, images, time and places in the queue.

ServerLimits is built once from `bimode serve`'s flags (`from_config`), then completed from the engine when the app
starts (`resolve_limits`, `engine_limits`). docs/serving_and_eval.md has the limits and what a hostile-traffic
test measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from bimode.generation.defaults import default_max_new_tokens

# A request body's default cap: room for two images at ServerLimits' 10 MiB image limit, base64-encoded (4/3 as
# large), and 4 MiB of text beside them.
DEFAULT_MAX_REQUEST_BYTES = 2 * (10 * 1024 * 1024 * 4 // 3) + 4 * 1024 * 1024
BODY_TIMEOUT_S = 30.0  # to send the whole body: a client that trickles it holds a place among the waiting ones


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
    # hosts fetched whatever they resolve to; given, no other host is fetched (vLLM's --allowed-media-domains)
    allowed_media_domains: list[str] = field(default_factory=list)
    # CIDR networks whose non-public addresses (loopback, private, link-local, ...) may be fetched (url_guard)
    allowed_media_networks: list[str] = field(default_factory=list)
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


def resolve_limits(limits: ServerLimits, engine) -> ServerLimits:
    """The limits with `default_new_tokens` filled in: the model's own limit, else 8,192, within the cap."""
    if limits.default_new_tokens is not None:
        return limits
    return replace(limits, default_new_tokens=min(default_max_new_tokens(engine), limits.max_tokens))


def engine_limits(limits: ServerLimits, engine) -> ServerLimits:
    """The limits that come from the engine: the longest text one token can stand for (from the tokenizer's
    vocabulary), the tokens an image takes, whether the engine shares prefixes (budget and log-probs), and the
    prompt limit when none is set (the engine's context length, else 32,768)."""
    tokenizer = engine.tokenizer
    longest = max((len(tokenizer.decode([i], skip_special_tokens=False)) for i in range(len(tokenizer))), default=1)
    return replace(limits, max_token_chars=max(1, longest), image_tokens=engine.image_tokens,
                   shared_prefix=bool(getattr(engine, "shared_prefix", True)),
                   max_model_len=limits.max_model_len or getattr(engine, "context_length", None) or 32768)
