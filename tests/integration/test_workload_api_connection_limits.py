"""Connections that do nothing cannot crowd out the Workload API's clients.

Reproduces issue 10, section 5: silent connections from one uid filled the global
``max_connections`` cap, and nothing ever closed them. Now one uid may hold at most
``max_connections_per_uid``, a connection that has not sent the HTTP/2 client
preface within ``preface_timeout`` is closed, and one with no call for
``idle_timeout`` is closed by grpc (GOAWAY); a call in progress keeps its
connection however long it stays quiet.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from agent.workload_api.client import WorkloadApiClient
from api.protos import workload_pb2 as pb
from tests.integration.workload_api_harness import Harness, entry
from tests.support.require import require_root

UID = os.getuid()
WEB = "spiffe://example.org/web"
NOBODY = 65534
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the agent sends until it closes the connection (30 s at most)."""
    s.settimeout(30)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _frame_types(data: bytes) -> list[int]:
    types = []
    while len(data) >= 9:
        size = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + size:]
    return types


# Opens argv[2] connections to argv[1], sends nothing, and holds them.
_SILENT = r"""
import socket, sys
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    conns.append(s)
print("open", flush=True)
sys.stdin.readline()
"""


def _as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def test_silent_connections_of_one_uid_leave_room_for_another() -> None:
    require_root("(connects as a second uid)")
    # The preface timeout is long here: this is about the per-uid cap.
    harness = Harness(max_connections=8, max_connections_per_uid=4, preface_timeout=600)
    silent = subprocess.Popen(
        [sys.executable, "-c", _SILENT, str(harness.socket_path), "8"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_as_nobody,
    )
    try:
        harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
        assert silent.stdout is not None and silent.stdin is not None
        assert silent.stdout.readline() == "open\n"
        # Its first four are held (silent), the other four refused at once.
        _wait(lambda: harness.server.front.refused_count == 4)
        with WorkloadApiClient(harness.socket_path) as c:
            assert c.fetch_x509_svid().svids[0].spiffe_id == WEB
        assert silent.poll() is None  # still holding its connections
    finally:
        silent.kill()
        silent.wait()
        harness.close()


@pytest.mark.parametrize("sent", [b"", PREFACE[:10]], ids=["nothing", "half-a-preface"])
def test_a_connection_without_preface_is_closed(sent: bytes) -> None:
    harness = Harness(preface_timeout=0.5)
    try:
        harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(harness.socket_path))
            s.sendall(sent)
            assert _read_until_closed(s) == b""  # closed, with not a byte of HTTP/2
        with WorkloadApiClient(harness.socket_path) as c:
            assert c.fetch_x509_svid().svids[0].spiffe_id == WEB
    finally:
        harness.close()


def test_a_connection_that_is_not_http2_is_closed_at_once() -> None:
    harness = Harness(preface_timeout=600)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(harness.socket_path))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_until_closed(s) == b""
    finally:
        harness.close()


def test_an_idle_connection_is_closed() -> None:
    harness = Harness(idle_timeout=0.5)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(harness.socket_path))
            s.sendall(PREFACE + SETTINGS)  # a client, but one that never calls
            frames = _frame_types(_read_until_closed(s))
            assert frames[0] == 4  # the server's SETTINGS: it was served...
            assert 7 in frames  # ... and told GOAWAY before the close
        _wait(lambda: harness.server.front.connection_count == 0)
    finally:
        harness.close()


def test_an_open_stream_is_never_reaped() -> None:
    harness = Harness(idle_timeout=0.2)
    try:
        harness.set_state([entry("e1", WEB, f"unix:uid:{UID}")])
        with WorkloadApiClient(harness.socket_path) as c:
            stream = c.stream("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            first = next(stream)
            assert first.svids[0].spiffe_id == WEB
            # Many idle periods with the stream open and nothing to say.
            time.sleep(2.0)
            assert harness.server.front.connection_count == 1
            renewed = harness.ca.svid(WEB)
            harness.call(lambda: harness.cache.set_x509_svid("e1", renewed))
            second = next(stream)  # the same stream, still open, hears the rotation
            assert second.svids[0].x509_svid != first.svids[0].x509_svid
            stream.cancel()  # type: ignore[attr-defined]
    finally:
        harness.close()
