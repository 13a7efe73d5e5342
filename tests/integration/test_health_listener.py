"""The health listener under idle and slow connections (issue 10, section 5).

``ThreadingHTTPServer`` gave every connection a thread with no timeout: 500 idle
connections were 500 threads, kept forever. Now a connection waits without a
thread until it speaks, is closed after the idle timeout, a request must arrive
whole within the request deadline, and a few threads answer.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

import ca.health
from ca.health import HealthServer

IDLE = 500
TIMEOUT = 2.0  # both the idle timeout and the request deadline, in seconds


@pytest.fixture
def health(monkeypatch: pytest.MonkeyPatch) -> Iterator[HealthServer]:
    monkeypatch.setattr(ca.health, "IDLE_TIMEOUT", TIMEOUT, raising=False)
    monkeypatch.setattr(ca.health, "REQUEST_TIMEOUT", TIMEOUT, raising=False)
    registry = CollectorRegistry()
    server = HealthServer("127.0.0.1:0", ready=lambda: None, registry=lambda: registry)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def _wait_closed(socks: list[socket.socket], within: float) -> list[socket.socket]:
    """Those of ``socks`` the server has not closed after ``within`` seconds."""
    for s in socks:
        s.settimeout(0.01)
    end = time.monotonic() + within
    left = socks
    while left and time.monotonic() < end:
        left = [s for s in left if not _closed(s)]
        time.sleep(0.1)
    return left


def test_idle_and_dripping_connections_neither_starve_nor_pile_up(
        health: HealthServer) -> None:
    host, port = health.bound_address.rsplit(":", 1)
    before = threading.active_count()
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(IDLE)]
    drip = socket.create_connection((host, int(port)), timeout=5)
    stop = threading.Event()

    def dripping() -> None:
        # A request one byte every half second: alive by any per-read timeout.
        for byte in b"GET /live HTTP/1.1\r\nHost: x\r\n" * 10:
            if stop.wait(0.5):
                return
            try:
                drip.send(bytes([byte]))
            except OSError:
                return

    dripper = threading.Thread(target=dripping, daemon=True)
    dripper.start()
    try:
        time.sleep(0.5)  # let the server accept them
        # A probe is answered while they are open ...
        url = f"http://{health.bound_address}/live"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert (resp.status, resp.read()) == (200, b"live\n")
        # ... by a few threads (MAX_HANDLERS and the waiting room's), not one per
        # connection.
        grown = threading.active_count() - before
        assert grown <= 20, grown
        # The drip is cut at the request deadline, though it keeps sending.
        assert _wait_closed([drip], within=TIMEOUT + 30) == []
        # The idle ones are closed after the idle timeout.
        assert len(_wait_closed(idle, within=TIMEOUT + 30)) == 0
    finally:
        stop.set()
        dripper.join(timeout=5)
        for s in [*idle, drip]:
            s.close()
