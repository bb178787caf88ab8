"""`bimode serve` started by a script (the soak, the chat page's screenshot): on a free loopback port, its output in a
log file, handed back once /health answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model: str, flags: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """(the server's process, its base URL) for `bimode serve MODEL --host 127.0.0.1 --port P FLAGS`."""
    port = free_port()
    command = [sys.executable, "-m", "bimode.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"bimode serve exited with {process.returncode}; its log: {log_path}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"bimode serve did not answer /health in 120 s; its log: {log_path}")
