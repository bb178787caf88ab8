"""Servers on the loopback interface for tests: a free port, waiting for /health, an ASGI app in a thread."""

import threading
import time

import httpx


def free_port() -> int:
    """A free port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base: str, tries: int = 100, process=None) -> bool:
    """Poll base/health every 0.1 s until it answers 200 (True), `tries` run out or `process` ends (False)."""
    for _ in range(tries):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.1)
        if process is not None and process.poll() is not None:
            return False
    return False


def serve_in_thread(app):
    """Run an ASGI app with uvicorn on a free loopback port; returns (base URL, stop function)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return base, stop
