"""Remote image URLs in `bimode serve` requests: off by default; with --allow_remote_images fetched over http(s)
within a size cap, a deadline and a redirect limit, every failure a 400 naming the URL and the reason; from
internal addresses (this module's 127.0.0.1 included) only when the operator allows them, at every redirect, and
from the very address that was checked. The images come from an HTTP server this module starts on 127.0.0.1."""

import io
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from bimode.serve.errors import BadRequest
from bimode.serve.limits import ServerLimits
from bimode.serve.requests import parse_request


def _png(size=(12, 8), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
BIG = b"\0" * 300_000  # over the tests' 200,000-byte cap


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # a body without Content-Length ends when the connection closes

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status, body=b"", headers=(), length=True):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        routes = {
            "/grid.png": lambda: self._send(200, PNG, [("Content-Type", "image/png")]),
            "/big.png": lambda: self._send(200, BIG, [("Content-Type", "image/png")]),
            # no Content-Length: the cap must hold while reading, not only on the declared size
            "/big-unsized.png": lambda: self._send(200, BIG, [("Content-Type", "image/png")], length=False),
            "/loop": lambda: self._send(302, headers=[("Location", "/loop")]),
            "/hop": lambda: self._send(302, headers=[("Location", "/grid.png")]),
            "/to-ftp": lambda: self._send(302, headers=[("Location", "ftp://127.0.0.1/grid.png")]),
            # redirects from an allowed server to internal addresses: each hop is checked like the first
            "/to-other-loopback": lambda: self._redirect(f"http://127.0.0.2:{self._port}/grid.png"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-localhost": lambda: self._redirect(f"http://localhost:{self._port}/grid.png"),
            "/page.html": lambda: self._send(200, b"<html>not an image</html>", [("Content-Type", "text/html")]),
            "/slow.png": self._slow,
            # three hops of 0.4 s each before any body: every hop is within 1 s, the fetch is not
            "/late-hop-1": lambda: self._late(302, "/late-hop-2"),
            "/late-hop-2": lambda: self._late(302, "/late-hop-3"),
            "/late-hop-3": lambda: self._late(302, "/grid.png"),
        }
        routes.get(self.path, lambda: self._send(404, b"not found"))()

    @property
    def _port(self):
        return self.server.server_address[1]

    def _redirect(self, location):
        self._send(302, headers=[("Location", location)])

    def _late(self, status, location):
        time.sleep(0.4)
        self._send(status, headers=[("Location", location)])

    def _slow(self):  # a byte every 0.2 s: each read is quick, the whole fetch is not
        self.send_response(200)
        self.end_headers()
        for byte in PNG[:20]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.2)


@pytest.fixture(scope="module")
def images():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# the image server is on loopback, refused unless allowed: these tests allow it by network
ON = ServerLimits(allow_remote_images=True, remote_image_max_bytes=200_000, remote_image_timeout=1.0,
                  allowed_media_networks=["127.0.0.0/8"])
DEFAULT_ON = replace(ON, allowed_media_networks=[])  # remote images on, nothing internal allowed


def _body(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour is it?"}]}]}


def test_remote_png_is_fetched_when_allowed(images):
    for path in ("/grid.png", "/hop"):  # a redirect within the limit is followed
        prompt = parse_request(_body(images + path), ON)[0]
        assert len(prompt.images) == 1 and prompt.images[0].size == (12, 8)
        assert prompt.images[0].getpixel((0, 0)) == (200, 30, 30)


def test_remote_images_are_off_by_default_and_say_how_to_turn_them_on(images):
    with pytest.raises(BadRequest, match="--allow_remote_images") as caught:
        parse_request(_body(images + "/grid.png"), ServerLimits())
    assert caught.value.status == 400 and caught.value.param == "messages[0].content[0]"


@pytest.mark.parametrize("path, reason", [
    ("/big.png", "300000 bytes, over the limit of 200000"),
    ("/big-unsized.png", "over the limit of 200000 bytes"),
    ("/loop", "more than 3 redirects"),
    ("/to-ftp", "unsupported scheme"),
    ("/page.html", "cannot decode image"),
    ("/missing.png", "HTTP 404"),
    ("/slow.png", "took longer than 1 s"),
    ("/late-hop-1", "took longer than 1 s"),
])
def test_every_failed_fetch_is_a_400_naming_the_url_and_the_reason(images, path, reason):
    url = images + path
    with pytest.raises(BadRequest) as caught:
        parse_request(_body(url), ON)
    message = str(caught.value)
    assert caught.value.status == 400 and url in message and reason in message, message
    assert message.startswith("messages[0].content[0]")


def test_unreachable_host_and_other_schemes():
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        server_gone = f"http://127.0.0.1:{s.getsockname()[1]}/grid.png"
    with pytest.raises(BadRequest, match="cannot fetch image http://127.0.0.1:.*ConnectError"):
        parse_request(_body(server_gone), ON)
    with pytest.raises(BadRequest, match="scheme 'ftp' is not supported"):
        parse_request(_body("ftp://127.0.0.1/grid.png"), ON)


def _refusal(url, limits):
    with pytest.raises(BadRequest) as caught:
        parse_request(_body(url), limits)
    message = str(caught.value)
    assert caught.value.status == 403 and message.startswith(f"messages[0].content[0]: cannot fetch image {url}: ")
    return message


def test_a_loopback_url_is_refused_by_default_and_fetched_when_listed_by_network_or_domain(images):
    url = images + "/grid.png"
    message = _refusal(url, DEFAULT_ON)
    assert message.endswith("127.0.0.1 is a loopback address; allow it with --allowed_media_networks, or the host "
                            "with --allowed_media_domains"), message
    for allowed in (replace(DEFAULT_ON, allowed_media_networks=["127.0.0.1/32"]),
                    replace(DEFAULT_ON, allowed_media_domains=["127.0.0.1"])):
        assert parse_request(_body(url), allowed)[0].images[0].size == (12, 8)
    # listed domains are the only hosts fetched: this one is not among them
    assert "host 127.0.0.1 is not in --allowed_media_domains" in _refusal(
        url, replace(DEFAULT_ON, allowed_media_domains=["images.example.com"]))


def test_a_refusal_says_the_same_whether_or_not_something_listens_there(images):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nothing = f"http://127.0.0.1:{s.getsockname()[1]}/grid.png"
    live = images + "/grid.png"
    assert _refusal(live, DEFAULT_ON).replace(live, "URL") == _refusal(nothing, DEFAULT_ON).replace(nothing, "URL")


@pytest.mark.parametrize("host, said", [
    ("localhost", ("localhost resolves to ", ", a loopback address")),  # a name, resolved: 127.0.0.1 or ::1
    ("[::1]", ("::1 is a loopback address",)),
    ("[::ffff:127.0.0.1]", ("is an IPv6 form of 127.0.0.1, a loopback address",)),
    ("0.0.0.0", ("0.0.0.0 is an unspecified address",)),
    ("169.254.169.254", ("169.254.169.254 is a link-local address",)),
    ("10.1.2.3", ("10.1.2.3 is a private address",)),
])
def test_internal_hosts_are_refused_before_any_connection(images, host, said):
    port = images.rsplit(":", 1)[1]
    message = _refusal(f"http://{host}:{port}/grid.png", DEFAULT_ON)
    assert all(part in message for part in said), message


@pytest.mark.parametrize("path, reason", [
    ("/to-other-loopback", "redirected to http://127.0.0.2:{port}/grid.png: 127.0.0.2 is a loopback address"),
    ("/to-metadata", "redirected to http://169.254.169.254/latest/meta-data/: 169.254.169.254 is a link-local"),
])
def test_a_redirect_from_an_allowed_server_to_a_refused_address_is_refused(images, path, reason):
    only_this_server = replace(DEFAULT_ON, allowed_media_networks=["127.0.0.1/32"])
    assert parse_request(_body(images + "/hop"), only_this_server)[0].images[0].size == (12, 8)
    message = _refusal(images + path, only_this_server)
    assert reason.format(port=images.rsplit(":", 1)[1]) in message, message


def test_a_redirect_from_a_listed_domain_to_a_host_not_listed_is_refused(images):
    only_this_host = replace(DEFAULT_ON, allowed_media_domains=["127.0.0.1"])
    assert parse_request(_body(images + "/hop"), only_this_host)[0].images[0].size == (12, 8)
    message = _refusal(images + "/to-localhost", only_this_host)
    assert f"redirected to http://localhost:{images.rsplit(':', 1)[1]}/grid.png: host localhost is not in " \
           "--allowed_media_domains" in message, message


def test_the_connection_goes_to_the_address_that_was_checked(images, monkeypatch):
    """DNS rebinding: a name answers an allowed address to the check and another one afterwards. The fetch
    resolves it once and connects to that answer; resolving again would connect to 127.0.0.2 (refused here,
    and nothing listens there)."""
    import socket

    real, asked = socket.getaddrinfo, []

    def rebinding(host, port, *args, **kwargs):
        if host != "images.test":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return real("127.0.0.1" if len(asked) == 1 else "127.0.0.2", port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = images.rsplit(":", 1)[1]
    allowed = replace(DEFAULT_ON, allowed_media_networks=["127.0.0.1/32"])
    assert parse_request(_body(f"http://images.test:{port}/grid.png"), allowed)[0].images[0].size == (12, 8)
    assert asked == ["images.test"]
    # the next request resolves afresh, gets the other answer and is refused before connecting
    assert "images.test resolves to 127.0.0.2, a loopback address" in _refusal(f"http://images.test:{port}/grid.png",
                                                                               allowed)
