"""Limits of the Workload API: connection bound, 2,000 connections, a client that never reads.

These speak HTTP/2 by hand (standard library only) so the client can misbehave in
ways grpc would not: stop reading, or hold thousands of connections at once.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from agent.workload_api.client import WorkloadApiClient
from tests.integration.workload_api_harness import Harness, entry

UID = os.getuid()
WEB = "spiffe://example.org/web"
PAGE = os.sysconf("SC_PAGE_SIZE")


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([kind, flags])
    return head + stream.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:  # HPACK literal, no indexing, no Huffman
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _fetch_x509_request() -> bytes:
    """Preface, SETTINGS, and one FetchX509SVID call on stream 1."""
    headers = b"".join(_literal(n, v) for n, v in (
        (b":method", b"POST"), (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"), (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
        (b"workload.spiffe.io", b"true"),
    ))
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
            + _frame(1, 4, 1, headers) + _frame(0, 1, 1, b"\x00" * 5))


def _outcome(s: socket.socket) -> str:
    """"served" once a response message arrives; "refused" when the agent closes first."""
    buf = b""
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return "refused"
            if not chunk:
                return "refused"
            buf += chunk
        size = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload, buf = buf[9:9 + size], buf[9 + size:]
        if kind == 4 and not flags & 1:
            s.sendall(_frame(4, 1, 0, b""))
        elif kind == 0 and stream == 1 and len(payload) > 5:
            return "served"
        elif (kind == 1 and flags & 1) or kind in (3, 7):
            return f"ended (frame type {kind})"


def _connect(s: socket.socket, path: str) -> None:
    # Blocking: a Unix socket cannot wait for a full backlog in non-blocking mode
    # (EAGAIN), and a timeout makes the socket non-blocking underneath.
    s.connect(path)
    s.settimeout(60)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def raised_nofile() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Both ends of 2,000 connections live in this process, plus the agent's relay
    # sockets and pidfds: about 6 descriptors per served connection.
    want = 10_000
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_over_the_bound_are_closed_and_the_rest_served() -> None:
    harness = Harness(max_connections=3)
    try:
        harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
        socks = [socket.socket(socket.AF_UNIX) for _ in range(5)]
        try:
            for s in socks:
                _connect(s, str(harness.socket_path))
            for s in socks:
                try:
                    s.sendall(_fetch_x509_request())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # already closed by the agent: _outcome says "refused"
            outcomes = [_outcome(s) for s in socks]
        finally:
            for s in socks:
                s.close()
        assert outcomes == ["served"] * 3 + ["refused"] * 2
        assert harness.server.front.refused_count == 2
        _wait(lambda: harness.server.front.connection_count == 0)
        with WorkloadApiClient(harness.socket_path) as c:
            assert c.fetch_x509_svid().svids[0].spiffe_id == WEB
    finally:
        harness.close()


@pytest.mark.slow
@pytest.mark.usefixtures("raised_nofile")
def test_two_thousand_connections_at_once() -> None:
    harness = Harness()  # the default bound, 1024
    try:
        harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
        socks: list[socket.socket] = []
        try:
            for _ in range(2000):
                s = socket.socket(socket.AF_UNIX)
                socks.append(s)
                _connect(s, str(harness.socket_path))
            for s in socks:
                try:
                    s.sendall(_fetch_x509_request())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # already closed by the agent: _outcome says "refused"
            outcomes = [_outcome(s) for s in socks]
        finally:
            for s in socks:
                s.close()
        assert outcomes.count("served") == 1024
        assert outcomes.count("refused") == 976
        assert harness.server.front.refused_count == 976
        _wait(lambda: harness.server.front.connection_count == 0)
        with WorkloadApiClient(harness.socket_path) as c:
            assert c.fetch_x509_svid().svids[0].spiffe_id == WEB
    finally:
        harness.close()


@pytest.mark.slow
def test_client_that_never_reads_does_not_grow_memory() -> None:
    """A stream whose client stops reading while updates flow stays bounded.

    HTTP/2 flow control stops grpc once the client's window (64 KiB) is full, the
    relay stops reading from grpc once the client's socket is full, and the
    stream's handler, blocked in its send, coalesces the changes it misses.
    """
    harness = Harness()
    try:
        entries = [entry(f"e{i}", f"{WEB}/{i}", f"unix:uid:{UID}") for i in range(20)]
        harness.set_state(entries)
        size = len(WorkloadApiClient(harness.socket_path).fetch_x509_svid().SerializeToString())
        with socket.socket(socket.AF_UNIX) as stalled:
            stalled.connect(str(harness.socket_path))
            stalled.sendall(_fetch_x509_request())
            assert _outcome(stalled) == "served"  # the stream is live...
            # ... and from now on its client never reads.
            svids = [harness.ca.svid(e.spiffe_id) for e in entries]

            def rotate(n: int) -> None:
                for i in range(n):
                    k = i % len(entries)
                    harness.call(
                        lambda k=k: harness.cache.set_x509_svid(entries[k].id, svids[k])  # type: ignore[misc]
                    )
                    svids[k] = harness.ca.svid(entries[k].spiffe_id)

            rotate(200)  # fill every buffer on the way
            before = _rss()
            updates = 2000
            rotate(updates)
            growth = _rss() - before
            # A reading client on another connection still gets fresh answers.
            with WorkloadApiClient(harness.socket_path) as c:
                assert len(c.fetch_x509_svid().svids) == 20
        pushed = updates * size
        print(f"{updates} updates of {size} bytes ({pushed >> 20} MiB) to a client "
              f"that never reads: RSS grew {growth / (1 << 20):.1f} MiB")
        assert pushed > 40 << 20
        assert growth < 16 << 20
    finally:
        harness.close()
