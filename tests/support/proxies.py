"""Running ``sigil-proxy`` processes and plain-TCP programs behind them, for the tests.

The proxy runs as ``python -m proxy`` with the repository first on PYTHONPATH, so
the tests do not depend on the console script having been installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def proxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *args]


def proxy_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))


class ProxyProcess:
    """One ``sigil-proxy run`` with its log file."""

    def __init__(self, name: str, log_dir: Path, args: list[str]) -> None:
        self.name = name
        self.log_path = log_dir / f"proxy-{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(proxy_command("run", *args), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=proxy_env(), cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, needle: str) -> int:
        return self.log().count(needle)

    def wait_for_log(self, pattern: str, *, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log())) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy {self.name} exited {self.proc.returncode}:\n"
                                     + self.log())
            time.sleep(0.1)
        raise AssertionError(f"proxy {self.name}: no {count}x {pattern!r} in {timeout}s:\n"
                             + self.log()[-4000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"proxy {self.name} ignored SIGTERM") from None
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def proxies(log_dir: Path) -> Iterator[list[ProxyProcess]]:
    """A list to add proxies to; all are stopped (and must exit 0) at the end."""
    started: list[ProxyProcess] = []
    try:
        yield started
    finally:
        codes = {p.name: p.stop() for p in started}
    assert all(code == 0 for code in codes.values()), codes


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = f"hello from the backend, path {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_backend() -> Iterator[int]:
    """A plain HTTP server (python's http.server) on 127.0.0.1; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def echo_backend() -> Iterator[int]:
    """A TCP server that echoes each connection until EOF, then half-closes; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(256 * 1024):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@contextlib.contextmanager
def count_backend() -> Iterator[int]:
    """A TCP server that answers only after the client's EOF: ``got N bytes``; yields its port.

    Through a proxy it works only if the client's half-close reaches it and the
    answer still travels back afterwards.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn:
            total = 0
            while data := conn.recv(65536):
                total += len(data)
            conn.sendall(f"got {total} bytes".encode())

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def http_get(port: int, path: str = "/", timeout: float = 20) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return str(resp.read().decode())


def echo_round_trip(port: int, size: int, *, timeout: float = 120) -> tuple[str, str]:
    """Send ``size`` bytes, half-close, read the echo to EOF: (sent sha256, received sha256)."""
    sent, received = hashlib.sha256(), hashlib.sha256()
    chunk = os.urandom(1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        def writer() -> None:
            left = size
            while left:
                piece = chunk[: min(left, len(chunk))]
                sock.sendall(piece)
                sent.update(piece)
                left -= len(piece)
            sock.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=writer)
        thread.start()
        while data := sock.recv(1024 * 1024):
            received.update(data)
        thread.join()
    return sent.hexdigest(), received.hexdigest()
