"""The images of a chat request: an `image_url` (data URL, http(s) URL, local path or file:// URL) to a decoded RGB
image, within the server's limits, or BadRequest naming the message part (`where`) and what is wrong.

Local paths are read only under `--allow_image_dir`, remote URLs fetched only with `--allow_remote_images`: either
lets a client make the server open what it names. Remote ones come only from public addresses unless the operator
allows others (url_guard.py)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import time
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from bimode.serve import url_guard
from bimode.serve.errors import BadRequest
from bimode.serve.limits import ServerLimits

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def decode_image(url: Any, limits: ServerLimits, where: str) -> Image.Image:
    """The image an `image_url.url` names, as RGB."""
    raw, label = _image_bytes(url, limits, where)
    return _open_image(raw, limits, where, label)


def _image_bytes(url: Any, limits: ServerLimits, where: str) -> tuple[bytes, str]:
    """The encoded image and what decoding errors call it (`where`, and a remote one's URL)."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: image_url.url must be a non-empty string", where)
    if url.startswith("data:"):
        return _data_url_bytes(url, limits, where), where
    if url.startswith(("http://", "https://")):
        raw, content_type = _fetch_remote_image(url, limits, where)
        return raw, f"{where} ({url}, Content-Type {content_type or 'not given'})"
    if _SCHEME.match(url) and not url.startswith("file://"):
        raise BadRequest(f"{where}: image URL scheme {url.split(':', 1)[0]!r} is not supported "
                         "(use http, https, data or file)", where)
    return _read_local_image(url.removeprefix("file://"), limits, where), where


def _open_image(raw: bytes, limits: ServerLimits, where: str, label: str) -> Image.Image:
    """Decoded within the pixel limit (checked from the header, before the pixels are decoded)."""
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


def _data_url_bytes(url: str, limits: ServerLimits, where: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadRequest(f"{where}: data URLs must be base64-encoded", where)
    if len(payload) * 3 // 4 > limits.max_image_bytes:  # the decoded size, known before decoding
        raise BadRequest(f"{where}: image is larger than {limits.max_image_bytes} bytes", where, status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: image data is not valid base64", where) from None


def _fetch_remote_image(url: str, limits: ServerLimits, where: str) -> tuple[bytes, str | None]:
    """The bytes at an http(s) URL and their Content-Type, within the size cap, the redirect limit and one
    deadline for the whole fetch: redirects are followed here, and every hop's network operations get only
    what is left of the deadline (httpx's own timeout is per operation, and a server that trickles bytes
    would otherwise hold the request for ever). Every hop's host is checked and connected to at the address
    checked (url_guard): a refused one is a 403 that says nothing of what listens there."""
    import httpx

    if not limits.allow_remote_images:
        raise BadRequest(f"{where}: remote image URLs are not fetched unless the server runs with "
                         "--allow_remote_images; or send a base64 data URL", where)
    cap, seconds = limits.remote_image_max_bytes, limits.remote_image_timeout
    networks = url_guard.parse_networks(limits.allowed_media_networks)

    def fail(reason: str, status: int = 400) -> BadRequest:
        return BadRequest(f"{where}: cannot fetch image {url}: {reason}", where, status=status)

    deadline = time.monotonic() + seconds

    def time_left() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise fail(f"took longer than {seconds:g} s")
        return left

    current, hop = httpx.URL(url), ""  # hop: how a refusal names a redirect's target
    try:
        # trust_env=False: a proxy from the environment would connect (and resolve) past the check
        with httpx.Client(follow_redirects=False, trust_env=False) as client:
            for _ in range(limits.remote_image_max_redirects + 1):
                if not current.host:
                    raise fail(f"{hop}no host in the URL")
                try:
                    addresses = url_guard.checked_addresses(current.host, current.port or _PORTS[current.scheme],
                                                            limits.allowed_media_domains, networks)
                except url_guard.Refused as exc:
                    raise fail(f"{hop}{exc}", status=403) from None
                except OSError as exc:
                    raise fail(f"{hop}cannot resolve host {current.host} ({exc.strerror or exc})") from None
                with contextlib.closing(_send_pinned(client, current, addresses, time_left)) as response:
                    if response.is_redirect:
                        current = current.join(response.headers["location"])
                        if current.scheme not in _PORTS:
                            raise fail(f"redirected to an unsupported scheme ({current})")
                        hop = f"redirected to {current}: "
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


_PORTS = {"http": 80, "https": 443}


def _send_pinned(client, url, addresses, time_left):
    """The streamed response (the caller closes it) from the first of `addresses` that takes the connection."""
    import httpx

    for i, ip in enumerate(addresses):
        try:
            return client.send(url_guard.pinned_request(client, url, ip, time_left()), stream=True)
        except httpx.ConnectError:
            if i == len(addresses) - 1:
                raise
    raise AssertionError("checked_addresses returns at least one address")


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
