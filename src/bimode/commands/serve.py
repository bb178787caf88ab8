"""`bimode serve MODEL`: the OpenAI-compatible server."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from bimode.commands import help_text
from bimode.commands.parsing import CommandParser
from bimode.errors import UsageError
from bimode.generation.types import check_think_threshold
from bimode.serve.limits import DEFAULT_MAX_REQUEST_BYTES
from bimode.serve.requests import TEMPLATE_KWARGS
from bimode.serve.url_guard import parse_networks, split_list

HELP = help_text("serve")


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "local model directory or LoRA adapter folder (loaded with its base)"})
    host: str = field(default="127.0.0.1", metadata={"help": "bind address"})
    port: int = field(default=8000, metadata={"help": "port"})
    allow_image_dir: str | None = field(default=None, metadata={"help": "serve local image paths under this directory only"})
    allow_remote_images: bool = field(default=False, metadata={
        "help": "fetch http(s) image URLs (off by default: it lets any client make the server open URLs)"})
    remote_image_max_bytes: int = field(default=20 * 1024 * 1024, metadata={
        "help": "largest remote image fetched (default 20 MiB)"})
    remote_image_timeout: float = field(default=10.0, metadata={
        "help": "seconds for a whole remote image fetch, at most 3 redirects"})
    allowed_media_domains: list[str] = field(default_factory=list, metadata={
        "help": "with --allow_remote_images: the only hosts images are fetched from (spaces or commas), whatever "
                "addresses they resolve to; redirects to other hosts are refused (vLLM's --allowed-media-domains)"})
    allowed_media_networks: list[str] = field(default_factory=list, metadata={
        "help": "with --allow_remote_images: CIDR networks, e.g. 127.0.0.0/8,10.0.0.0/8, whose addresses may be "
                "fetched; by default a host that resolves to a loopback, private, link-local, multicast, "
                "unspecified or reserved address (IPv4 or IPv6) is refused (403), at every redirect"})
    think_threshold: float | None = field(default=None, metadata={
        "help": "auto mode thinks iff p_think >= this, for requests that set no think_threshold (pick it with "
                "`bimode eval calibrate`)"})
    max_batch: int = field(default=32, metadata={"help": "most samples generated together"})
    request_timeout: float = field(default=300.0, metadata={
        "help": "seconds from a request's arrival until it fails (504); its generation stops then"})
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata={
        "help": "largest request body; larger ones get 413 before they are parsed (default: room for two images "
                "at the 10 MiB image limit, base64-encoded, and text)"})
    max_queued_requests: int = field(default=64, metadata={
        "help": "most requests waiting for the engine (being read, parsed or queued); more get 503 with "
                "Retry-After"})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "on SIGTERM: seconds the requests in flight get to finish before they are cut off; no new ones "
                "are accepted, and the server then exits 0"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "model id reported (default: folder name); NAME:auto, NAME:think and NAME:no_think are listed "
                "too and force that mode"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1 (default: $BIMODE_API_KEY; /health and /metrics "
                "stay open)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "most prompt tokens (default: the model's position limit, else 32768)"})
    max_tokens: int = field(default=32768, metadata={
        "help": "most new tokens a request may ask for (a request without max_tokens gets the model's own "
                "limit, else 8192)"})
    default_chat_template_kwargs: dict | str | None = field(default=None, metadata={
        "help": 'JSON applied under each request\'s chat_template_kwargs, e.g. \'{"thinking_mode": "short"}\''})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow the checkpoint's own code"})
    no_ui: bool = field(default=False, metadata={
        "help": "leave out the chat page at / (on by default: drop an image, pick a mode, watch the answer and its "
                "reasoning stream; it calls /v1 like any client, with the API key typed into it)"})

    def __post_init__(self):
        if not self.model:
            raise UsageError("bimode serve needs a MODEL: a local model directory or adapter folder")
        check_think_threshold(self.think_threshold)
        for name in ("max_request_bytes", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        self.allowed_media_domains = split_list(self.allowed_media_domains)
        self.allowed_media_networks = split_list(self.allowed_media_networks)
        try:
            parse_networks(self.allowed_media_networks)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if (self.allowed_media_domains or self.allowed_media_networks) and not self.allow_remote_images:
            raise UsageError("allowed_media_domains and allowed_media_networks say which remote images are fetched: "
                             "give --allow_remote_images too")
        for name in ("request_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive")
        kwargs = self.default_chat_template_kwargs
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as exc:
                raise UsageError(f"default_chat_template_kwargs is not JSON: {exc}") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise UsageError("default_chat_template_kwargs must be a JSON object")
        unread = sorted(set(kwargs or {}) - TEMPLATE_KWARGS)
        if unread:
            raise UsageError(f"default_chat_template_kwargs: {', '.join(unread)} not read by bimode's chat template "
                             f"(it reads {', '.join(sorted(TEMPLATE_KWARGS))})")
        self.default_chat_template_kwargs = kwargs or {}


def make_parser(prog: str = "bimode serve") -> CommandParser:
    return CommandParser((ServeConfig,), prog=prog, description=HELP, positional={"model": "?"})


def main(cfg: ServeConfig) -> int:
    from bimode.serve.app import serve

    serve(cfg)
    return 0
